"""Benchmark: 2:4 post-training pruning quality by pruner and calibration size, with and without gAP.

For each calibration size and pruner (magnitude, AdaPrune, OBS) the whole model is pruned to
2:4 with `spdy.recovery.nm.prune_nm` and then fine-tuned with gAP under a fixed step budget; held-out
quality is read before gAP (the pruner alone) and after. Results go to a JSON file row by
row, so an interrupted run resumes; ``--table`` prints the Markdown table for docs/benchmarks.md.

Pruners ``llmc-sparsegpt`` and ``llmc-wanda`` run llm-compressor's one-shot SparseGPT / Wanda
at the same pattern on the same calibration batches (its sequential pipeline over the model's
decoder/encoder layers, so each layer sees the already-pruned model's inputs), followed by the
same gAP and the same held-out scoring. llm-compressor pins its own transformers, so those rows
run in a separate venv (see docs/benchmarks.md, "N:M and gAP").

    .venv/bin/python bench/bench_nm.py --model minilm --samples 128,512,1024 --seq-len 64 \
        --gap-steps 16 --lr 1e-4 --threads 1 --out bench/results/nm-minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from spdy.models import ModelBundle, load_model
from spdy.recovery.nm import HeldOut, calibration_samples, finish_with_gap, nm_pattern_kept, prune_nm
from spdy.pipeline import prunable_units
from spdy.units import Unit

LLMC = ("llmc-sparsegpt", "llmc-wanda")
VARIANTS = {"obs-norefine": ("obs", {"refine": 0})}  # our OBS without the least-squares refinement: plain SparseGPT on dense inputs


def prune_llmc(bundle: ModelBundle, units: dict[str, Unit], pattern: str, method: str, gap_steps: int, gap_batch: int, lr: float,
               work_dir: str) -> dict:
    """llm-compressor's one-shot pruner on the wrapped HF model, then our gAP, scored like ``prune_nm``."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from torch.utils.data import DataLoader

    teacher = copy.deepcopy(bundle.model)
    heldout = HeldOut(bundle, teacher)
    hf = getattr(bundle.model, "bert", None) or bundle.model.lm
    blocks = [name for name in hf._no_split_modules if "Layer" in name]  # BertLayer / LlamaDecoderLayer: where our units live
    n, m = (int(v) for v in pattern.split(":"))
    modifier = SparseGPTModifier if method == "llmc-sparsegpt" else WandaPruningModifier
    samples = calibration_samples(bundle.calibration)
    # llm-compressor re-reads the config from name_or_path: a GGUF folder has none, and its "gguf" quantization
    # record would be refused although transformers has already dequantized the weights to float32.
    config_dir = Path(work_dir) / f"config-{bundle.name}"
    hf.config.save_pretrained(config_dir)
    config = json.loads((config_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (config_dir / "config.json").write_text(json.dumps(config))
    hf.config._name_or_path = str(config_dir)
    oneshot(model=hf, processor=bundle.tokenizer, dataset=DataLoader(bundle.calibration, batch_size=None), num_calibration_samples=samples,
            recipe=modifier(sparsity=n / m, mask_structure=pattern, targets=blocks, ignore=["re:.*lm_head", "re:.*pooler.*"]))
    result = {"model": bundle.name, "pattern": pattern, "pruner": method, "samples": samples, "units": len(units), "loss": bundle.loss,
              **heldout(teacher, "dense")}
    tag = f"{bundle.name}-{method}-{samples}"
    result.update(finish_with_gap(bundle, units, teacher, epochs=100, lr=lr, batch_size=gap_batch, work_dir=Path(work_dir) / f"gap-{tag}", progress=False,
                                  heldout=heldout, max_steps=gap_steps))
    result["pattern_kept"] = nm_pattern_kept(units, pattern)
    return result


def quality(result: dict, when: str) -> float | None:
    """1 - cosine for sentence encoders (the bundle's loss), perplexity for causal LMs."""
    key = f"perplexity_{when}" if f"perplexity_{when}" in result else f"heldout_{when}"
    return result.get(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--samples", default="128,512,1024", help="calibration sizes")
    ap.add_argument("--pruners", default="magnitude,adaprune,obs", help=f"also {', '.join(VARIANTS)}, {', '.join(LLMC)} (needs llmcompressor)")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sample (pydoc text gives ~930 samples of 128)")
    ap.add_argument("--gap-steps", type=int, default=16, help="gAP optimiser steps per run (the paper: ~3200 of 32 samples)")
    ap.add_argument("--gap-batch", type=int, default=32, help="samples per gAP step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default="/tmp/spdy-bench-nm")
    ap.add_argument("--out", default="bench/results/nm.json")
    ap.add_argument("--table", action="store_true", help="only print the Markdown table of --out")
    args = ap.parse_args()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if not args.table:
        torch.set_num_threads(args.threads)
        done = {(r["samples"], r["pruner"]) for r in rows}
        for samples in (int(s) for s in args.samples.split(",")):
            base = None
            for pruner in args.pruners.split(","):
                if (samples, pruner) in done:
                    continue
                base = base or load_model(args.model, samples=samples, heldout=args.heldout, seq_len=args.seq_len)
                bundle = copy.deepcopy(base)
                units = prunable_units(bundle)
                started = time.perf_counter()
                if pruner in LLMC:
                    result = prune_llmc(bundle, units, "2:4", pruner, args.gap_steps, args.gap_batch, args.lr, args.work_dir)
                else:
                    name, params = VARIANTS.get(pruner, (pruner, {}))
                    result = prune_nm(bundle, units, "2:4", name, gap=True, work_dir=args.work_dir, epochs=100, lr=args.lr,
                                      batch_size=args.gap_batch, max_steps=args.gap_steps, progress=False, pruner_params=params)
                    result["pruner"] = pruner
                result["seconds"] = round(time.perf_counter() - started, 1)
                result["seq_len"], result["threads"] = args.seq_len, args.threads
                rows.append(result)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: result[k] for k in ("samples", "pruner", "heldout_before_gap", "heldout_after_gap", "seconds")}), flush=True)
    perplexity = bool(rows) and "perplexity_dense" in rows[0]
    digits = ".2f" if perplexity else ".4f"
    metric = "perplexity" if perplexity else f"held-out {rows[0]['loss'] if rows else 'loss'}"
    print(f"| samples | pruner | {metric} 2:4 | after gAP | gAP steps x batch |\n|---|---|---|---|---|")
    order = ["magnitude", "adaprune", *VARIANTS, "obs", *LLMC]
    for r in sorted(rows, key=lambda r: (r["samples"], order.index(r["pruner"]) if r["pruner"] in order else len(order))):
        print(f"| {r['samples']} | {r['pruner']} | {quality(r, 'before_gap'):{digits}} | {quality(r, 'after_gap'):{digits}} | {r['gap']['steps']} x {r['gap']['batch_size']} |")
    if rows:
        print(f"\ndense: {abs(quality(rows[0], 'dense')):{digits}}")


if __name__ == "__main__":
    main()
