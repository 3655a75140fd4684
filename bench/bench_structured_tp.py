"""Torch-Pruning at the shapes of spdy's uniform structured profile: same speed, its own choice of heads/neurons.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_structured_tp.py --rows rows.jsonl --target 1.5 [--rounds 20]
    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_structured_tp.py --model smollm2 --rows rows.jsonl --target 1.3 \
        --workload prefill:4x128 --heldout 32

Reads the uniform profile `bench_structured.py` measured at ``--target`` (its row in ``--rows``),
turns it into kept fractions of heads and of neurons (uniform: one per kind), and prunes the dense
model with Torch-Pruning (`pip install torch-pruning`): `MetaPruner`, its default
`GroupMagnitudeImportance(p=2)` (q/k/v rows and output columns of a head scored together; the
up-projection row and down-projection column of a neuron together), whole heads only, the hidden
size untouched (every layer writing the residual stream is ignored), no reconstruction. The
result has the uniform profile's layer shapes, so it runs at its speed; both are measured here
against the dense model (alternated rounds, dense torch, median ratio) and scored on the same
held-out text with the run's held-out loss (1 - mean cosine of the pooled embeddings).

SmolLM2 (``--model smollm2``): Torch-Pruning 1.6.1's dependency graph treats the attention kernel
as element-wise and couples ``q_proj``'s 576 rows one-to-one with ``k_proj``'s 192, so under
grouped-query attention its head pruning indexes out of range and cannot run. Here its
`DependencyGraph` and `GroupMagnitudeImportance(p=2)` prune the gated MLP (gate and up rows with
down columns, one group per layer, the least important neurons out), and the key/value groups
are ranked by the same criterion by hand: the L2 norm of a group's q/k/v rows and ``o_proj``
columns. Each layer keeps what the uniform profile keeps; perplexity on the run's held-out text.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

from spdy.blocks import find_blocks, resize, structure_columns
from spdy.levels import Option
from spdy.models import load_model
from spdy.models.workload import Workload, workload_batch
from spdy.quality import outputs, quality
from spdy.runtime.formats import set_threads
from spdy.runtime.timer import time_alternating
from spdy.search.evaluate import Evaluator
from spdy.units import call_model


def torch_pruning_model(model: torch.nn.Module, example: dict, heads_ratio: float, neurons_ratio: float) -> torch.nn.Module:
    """A copy of the sentence encoder pruned by Torch-Pruning's MetaPruner, layer by layer (no global ranking)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    pruned = copy.deepcopy(model)
    bert = pruned.bert
    num_heads = {}
    for m in bert.modules():
        if isinstance(m, BertSelfAttention):
            num_heads[m.query] = num_heads[m.key] = num_heads[m.value] = m.num_attention_heads
    ignored = [bert.embeddings] + ([bert.pooler] if bert.pooler is not None else [])
    for layer in bert.encoder.layer:  # they write the residual stream: the hidden size stays
        ignored += [layer.attention.output.dense, layer.output.dense]
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=False,
                                  pruning_ratio=neurons_ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=heads_ratio, output_transform=lambda out: out.sum(),
                                  forward_fn=lambda m, x: m(**x))
    pruner.step()
    for m in bert.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return pruned.eval()


def torch_pruning_llama(model: torch.nn.Module, example: torch.Tensor, kept: dict[str, int]) -> torch.nn.Module:
    """A copy of the causal LM with each block keeping ``kept[block]`` structures: neurons by Torch-Pruning's
    group magnitude on its dependency graph, key/value groups by the same L2 criterion (see the module notes)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    lm = pruned.lm
    graph = tp.DependencyGraph().build_dependency(lm, example_inputs=example, forward_fn=lambda m, x: m(input_ids=x, use_cache=False),
                                                  output_transform=lambda out: out.logits.sum())
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for block in find_blocks(pruned):
        keep = kept[block.name]
        if keep >= block.count:
            continue
        if block.structure == "neurons":
            gate = pruned.get_submodule(block.producers[0])
            scores = importance(graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=list(range(block.count))))
            graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=scores.argsort()[: block.count - keep].tolist()).prune()
            continue
        consumer = pruned.get_submodule(block.consumer).weight.data
        norms = consumer.reshape(consumer.shape[0], block.count, block.width).square().sum(dim=(0, 2))
        for producer, rows in zip(block.producers, block.producer_rows()):
            norms += pruned.get_submodule(producer).weight.data.reshape(block.count, rows, -1).square().sum(dim=(1, 2))
        groups = sorted(norms.argsort(descending=True)[:keep].tolist())
        resize(pruned, block, groups, consumer[:, structure_columns(groups, block.width)].clone())
    return pruned.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--workload", help="the run's timing workload, e.g. prefill:4x128 (smollm2)")
    parser.add_argument("--rows", required=True, help="bench_structured.py's --out file")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append the row here as a JSON line")
    args = parser.parse_args()

    rows = [json.loads(line) for line in open(args.rows)]
    uniform = [r for r in rows if r["method"] == "uniform" and r["target"] == args.target and r["pruner"] == "obs"
               and r["model"] == args.model][-1]
    if args.model == "smollm2":
        return main_llama(args, uniform)
    fractions: dict[str, set[float]] = {}
    for key in uniform["kept"].values():
        option = Option.parse(key)
        fractions.setdefault(option.pattern if not option.is_dense else "dense", set()).add(option.sparsity)
    heads_ratio = max(fractions.get("heads", {0.0}))
    neurons_ratio = max(fractions.get("neurons", {0.0}))

    before = os.getloadavg()
    bundle = load_model("minilm", samples=8, heldout=args.heldout)
    dense = bundle.model
    batch = bundle.calibration[0]
    pruned = torch_pruning_model(dense, batch, heads_ratio, neurons_ratio)
    set_threads(args.threads)
    with torch.no_grad():
        evaluator = Evaluator(dense, bundle.heldout, bundle.loss, split="heldout")
        evaluator.model = pruned
        heldout = evaluator.score()
        samples = time_alternating({"dense": lambda: dense(**batch), "pruned": lambda: pruned(**batch)}, args.rounds)
    ratios = [d / p for d, p in zip(samples["dense"], samples["pruned"])]
    q = statistics.quantiles(ratios, n=4)
    speedup = statistics.median(ratios)
    after = os.getloadavg()
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters() if n.endswith("layer.0.attention.self.query.weight")
              or n.endswith("layer.0.intermediate.dense.weight")}
    print(f"torch-pruning at uniform's fractions (heads {heads_ratio:.4f}, neurons {neurons_ratio:.4f} removed), shapes {shapes}")
    print(f"| {args.target:g}x | - | torch-pruning (group magnitude, uniform shapes) | {speedup:.3f}x ({(q[2] - q[0]) / speedup:.3f}) | - | "
          f"{heldout:.4f} | {before[0]:.2f} / {after[0]:.2f} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"model": "minilm", "target": args.target, "method": "torch-pruning", "heads_removed": heads_ratio,
                                "neurons_removed": neurons_ratio, "measured_speedup": speedup, "spread": (q[2] - q[0]) / speedup,
                                "heldout_loss": heldout, "dense_ms": statistics.median(samples["dense"]) * 1e3,
                                "pruned_ms": statistics.median(samples["pruned"]) * 1e3, "load_before": before, "load_after": after}) + "\n")


def main_llama(args: argparse.Namespace, uniform: dict) -> None:
    """SmolLM2: Torch-Pruning at the uniform profile's per-block sizes, timed on the run's workload, perplexity on its held-out text."""
    before = os.getloadavg()
    bundle = load_model("smollm2", samples=8, heldout=args.heldout)
    dense = bundle.model
    blocks = {b.name: b for b in find_blocks(dense)}
    kept = {name: blocks[name].kept(key) for name, key in uniform["kept"].items()}
    pruned = torch_pruning_llama(dense, bundle.calibration[0]["input_ids"][:1, :32], kept)
    batch = workload_batch(bundle, Workload.parse(args.workload)) if args.workload else bundle.calibration[0]
    set_threads(args.threads)
    with torch.no_grad():
        metrics = quality(pruned, bundle.heldout, outputs(dense, bundle.heldout), bundle.loss)
        samples = time_alternating({"dense": lambda: call_model(dense, batch), "pruned": lambda: call_model(pruned, batch)}, args.rounds)
    ratios = [d / p for d, p in zip(samples["dense"], samples["pruned"])]
    q = statistics.quantiles(ratios, n=4)
    speedup = statistics.median(ratios)
    after = os.getloadavg()
    print(f"torch-pruning at uniform's sizes {sorted(set(kept.values()))}")
    print(f"| smollm2 | {args.target:g}x | - | torch-pruning (group magnitude, uniform shapes) | {speedup:.3f}x ({(q[2] - q[0]) / speedup:.3f}) | - | - | "
          f"{metrics['perplexity']:.3f} ({metrics['dense_perplexity']:.3f}) | {before[0]:.2f} / {after[0]:.2f} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"model": "smollm2", "target": args.target, "method": "torch-pruning", "workload": args.workload, "kept": kept,
                                "measured_speedup": speedup, "spread": (q[2] - q[0]) / speedup, "quality": metrics,
                                "dense_ms": statistics.median(samples["dense"]) * 1e3, "pruned_ms": statistics.median(samples["pruned"]) * 1e3,
                                "load_before": before, "load_after": after}) + "\n")


if __name__ == "__main__":
    main()
