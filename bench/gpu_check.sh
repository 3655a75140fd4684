#!/usr/bin/env bash
# The GPU engines on a machine with an NVIDIA GPU (compute capability 8.0+): their tests, then
# `spdy run` end to end on MiniLM with cuda-2:4 (2:4 sparse tensor cores, fp16) and with cuda
# (a physically smaller dense model, fp16), each a curve of targets whose profiles are measured.
#
#   bash bench/gpu_check.sh OUT [WORKLOAD] [SEARCH_BUDGET]
#
# OUT gets gpu.txt, tests.log, and per engine run-ENGINE.log (progress), run-ENGINE.json and
# report-ENGINE.md; the work directories (databases) stay under $WORK (default /tmp/spdy-gpu).
# Without `spdy` installed, run it with PYTHONPATH=src.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT [WORKLOAD] [SEARCH_BUDGET]}
workload=${2:-prefill:64x128}
budget=${3:-20s}
mkdir -p "$out"
spdy=(python3 -c 'import sys; from spdy.cli import main; sys.exit(main())')

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability(),
"cusparselt", torch.backends.cusparselt.is_available(), "cpu threads", torch.get_num_threads())'; } > "$out/gpu.txt" 2>&1

# test_timing_table_has_every_block_option times on the CPU only: left to the CPU suite.
timeout 120 python3 -m pytest -q -ra -p no:cacheprovider tests/test_cuda_semi.py tests/test_structured.py tests/test_verify_engines.py \
    -k "not test_timing_table_has_every_block_option" > "$out/tests.log" 2>&1
echo "tests exit $?" >> "$out/gpu.txt"

for engine in cuda-2:4 cuda; do
    pattern=$([ "$engine" = cuda ] && echo structured || echo 2:4)
    name=${engine/:/-}
    timeout "${RUN_TIMEOUT:-220}" "${spdy[@]}" run minilm --engine "$engine" --pattern "$pattern" --workload "$workload" --targets auto \
        --search-budget "$budget" --work-dir "${WORK:-/tmp/spdy-gpu}/$name" --json > "$out/run-$name.json" 2> "$out/run-$name.log"
    echo "run $engine exit $?" >> "$out/gpu.txt"
    cp "${WORK:-/tmp/spdy-gpu}/$name/report.md" "$out/report-$name.md" 2>/dev/null
done
