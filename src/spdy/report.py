"""A run's report: ``report.md`` and a self-contained ``report.html`` with plots.

Everything is read back from the work directory's ``summary.json`` (written by `spdy run`),
so ``spdy report DIR`` can redraw it at any time. Every speedup names its baseline: dense torch,
and where verify measured it the engine's fastest dense run, so a reader can tell sparsity's
share from the runtime's. Keys added later (the engine's dense run, the closed loop's
``rounds``) are shown when present; older summaries render without them.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from spdy.levels import DENSE, Option
from spdy.timing.table import TimingTable
from spdy.verification import BASELINE, VerifyResult

ENGINE_DENSE = "the engine's fastest dense run"


def _short(unit: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = unit.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i:])
    return unit


def _baseline(summary: dict) -> str:
    """What the run's speedups are over: the chosen profile's verify names it (dense torch on
    torch-cpu, and in summaries written before it was recorded)."""
    return summary["profiles"][summary["method"]].get("verify", {}).get("baseline", BASELINE)


def _plots(summary: dict, table: TimingTable, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(exist_ok=True)
    paths = {}
    units = table.units
    profiles = summary["profiles"]

    curve = [p for p in summary.get("curve", []) if p.get("quality_loss") is not None]
    if len({p["target"] for p in curve}) > 1:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for method in dict.fromkeys(p["method"] for p in curve):
            points = sorted((p["measured_speedup"], p["quality_loss"]) for p in curve if p["method"] == method)
            xs, ys = zip(*[(1.0, 0.0), *points])
            ax.plot(xs, ys, marker="o", ms=4, lw=2 if method == summary["method"] else 1.2, label=method)
        choice = summary.get("choice", {})
        ax.plot([1.0], [0.0], "ks", label="dense model")
        chosen = next((p for p in curve if p["method"] == summary["method"] and p["target"] == summary["target"]), None)
        if chosen:
            ax.plot([chosen["measured_speedup"]], [chosen["quality_loss"]], "r*", ms=14, label="exported")
        if choice.get("max_loss") is not None:
            ax.axhline(choice["max_loss"], color="r", ls="--", lw=1, label=f"--max-loss {choice['max_loss']:g}")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel(f"measured speedup over {_baseline(summary)}")
        ax.set_ylabel(f"held-out quality loss\n({choice.get('quality_loss_is', 'lower is better')})", fontsize=8)
        ax.set_title("Speed against quality: each point a profile, verified")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["curve"] = out / "curve.png"
        fig.savefig(paths["curve"], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(8, len(units) * 0.3), 4.5))
    width = 0.8 / len(profiles)
    for i, (method, p) in enumerate(profiles.items()):
        ax.bar([x - 0.4 + (i + 0.5) * width for x in range(len(units))], [p["profile"].get(u, 0.0) for u in units], width,
               label=method, edgecolor="k" if method == summary["method"] else None, linewidth=0.6)
    ax.set_xticks(range(len(units)), [_short(u) for u in units], rotation=90, fontsize=6)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.0)
    ax.set_title(f"Per-unit sparsity at {summary['target']:g}x target")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["profile"] = out / "profile.png"
    fig.savefig(paths["profile"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # units of one weight shape usually share a curve (measured once): one line per shape and curve
    curves: dict[tuple, list[str]] = {}
    for u in units:
        keys = table.options(u)
        curve = tuple(round(table.times[u][k] / table.times[u][DENSE], 4) for k in keys)
        curves.setdefault((tuple(table.shapes.get(u, {}).get("weight", ())), curve), []).append(u)
    for (shape, curve), members in curves.items():
        keys = table.options(members[0])
        label = f"{'x'.join(map(str, shape)) or _short(members[0])} ({len(members)} unit{'s' if len(members) > 1 else ''})"
        ax.plot([Option.parse(k).sparsity for k in keys], curve, lw=1.2, label=label)
    if len(curves) <= 12:
        ax.legend(fontsize=8, title="weight (out x in)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("time relative to the unit's 0% option")
    ax.set_title(f"Per-unit timing curves ({table.meta.get('backend', table.meta.get('engine', 'engine'))})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["timings"] = out / "timings.png"
    fig.savefig(paths["timings"], dpi=110)
    plt.close(fig)

    methods, baseline = list(profiles), _baseline(summary)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(methods))
    predicted = [profiles[m]["predicted_speedup"] for m in methods]
    measured = [profiles[m].get("verify", {}).get("measured_speedup", float("nan")) for m in methods]
    quartiles = [np.percentile(profiles[m].get("verify", {}).get("ratios") or [v], [25, 75]) for m, v in zip(methods, measured)]
    errors = [[max(v - q[0], 0) for v, q in zip(measured, quartiles)], [max(q[1] - v, 0) for v, q in zip(measured, quartiles)]]
    engine = [profiles[m].get("verify", {}).get("speedup_over_engine_dense") for m in methods]
    bars = 3 if any(e is not None for e in engine) else 2
    width = 0.8 / bars
    a1.bar([x - 0.4 + 0.5 * width for x in xs], predicted, width, label=f"predicted (table), over {baseline}")
    a1.bar([x - 0.4 + 1.5 * width for x in xs], measured, width, yerr=errors, capsize=3,
           label=f"measured over {baseline} (median, quartiles)")
    if bars == 3:
        a1.bar([x - 0.4 + 2.5 * width for x in xs], [float("nan") if e is None else e for e in engine], width,
               label=f"measured over {ENGINE_DENSE}")
    a1.axhline(summary["target"], color="r", ls="--", lw=1, label=f"target {summary['target']:g}x")
    a1.set_xticks(list(xs), methods, rotation=20)
    a1.set_ylabel(f"speedup over {baseline}" if bars == 2 else "speedup (each bar's baseline in the legend)")
    a1.set_title("Predicted vs measured speedup")
    a1.legend(fontsize=8)
    heldout = [profiles[m].get("heldout_loss") for m in methods]
    a2.bar(list(xs), [h if h is not None else float("nan") for h in heldout], color="tab:purple")
    a2.set_xticks(list(xs), methods, rotation=20)
    a2.set_ylabel(f"held-out loss ({summary.get('search_loss', summary['loss'])}, lower is better)")
    a2.set_title("Held-out quality at the same target")
    fig.tight_layout()
    paths["speedup"] = out / "speedup_quality.png"
    fig.savefig(paths["speedup"], dpi=110)
    plt.close(fig)

    searched = {m: p["convergence"] for m, p in profiles.items() if p.get("convergence")}
    if searched:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for method, c in searched.items():
            # step curves of the incumbent's loss, held to the search's end
            a1.step(c["seconds"] + [c.get("total_seconds") or c["seconds"][-1]], c["loss"] + c["loss"][-1:], where="post", label=method)
            a2.step(c["evaluations"] + [c.get("total_evaluations") or c["evaluations"][-1]], c["loss"] + c["loss"][-1:], where="post", label=method)
        a1.set_xlabel("seconds")
        a2.set_xlabel("candidates evaluated (any fidelity)")
        for ax in (a1, a2):
            ax.set_ylabel(f"best calibration loss ({summary.get('search_loss', summary['loss'])})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        a1.set_title("Search convergence over time")
        a2.set_title("... and over evaluations")
        fig.tight_layout()
        paths["convergence"] = out / "convergence.png"
        fig.savefig(paths["convergence"], dpi=110)
        plt.close(fig)
    return paths


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _verify_result(v: dict) -> VerifyResult | None:
    """The VerifyResult of a summary's verify JSON (keys it does not know are left out), None without one."""
    if "measured_speedup" not in v:
        return None
    known = {f.name for f in fields(VerifyResult)}
    return VerifyResult(**{k: x for k, x in v.items() if k in known})


def _headline(v: dict, predicted: float, target: float) -> list[str]:
    """The chosen profile's measured speedup with both baselines, its ratio to the target, and
    what went wrong: a miss, an over-delivery, a table that under-predicts."""
    result = _verify_result(v)
    if result is None:
        return [f"Not verified: predicted {predicted:.4f}x for a {target:g}x target."]
    engine = ("" if result.speedup_over_engine_dense is None else
              f" ({result.speedup_over_engine_dense:.4g}x over {ENGINE_DENSE}: {result.engine_baseline})")
    lines = [f"**Measured speedup {result.measured_speedup:.4g}x** over {result.baseline}{engine}, median of {result.rounds} "
             f"alternating rounds, spread {result.measured_spread:.2g}, for a predicted {predicted:.4f}x; "
             f"{result.measured_speedup / target:.3f}x the {target:g}x target: target {'met' if result.met else 'NOT met'}."]
    if result.met is False:
        lines += ["", f"**MISSED**: the profile runs below the target beyond the {result.tolerance:.0%} noise tolerance."]
    for note in (result.over_delivery(), result.under_prediction()):
        if note:
            lines += ["", f"**Note**: {note}."]
    if g := result.generation:
        lines += ["", f"Generating ({g['new_tokens']} greedy tokens after {g['prompt_tokens']} cached ones, the model's own `generate`, "
                      f"median of {g['rounds']} alternating rounds): dense {g['dense_tokens_per_s']:.4g} tokens/s, pruned "
                      f"{g['pruned_tokens_per_s']:.4g} tokens/s, **{g['speedup']:.3g}x**; {g['greedy_agreement']:.0%} of the pruned "
                      "model's tokens equal its masked dense twin's."]
    return lines


def _device(meta: dict) -> str:
    """Where the table was timed: the GPU and dtype for the GPU engines, else threads and CPU."""
    if "gpu" in meta:
        return f"GPU {meta['gpu']} in {meta.get('dtype', '?')} (CUDA {meta.get('cuda', '?')}, torch {meta.get('torch', '?')})"
    return f"{meta.get('threads', '?')} threads, CPU {meta.get('cpu', '?')}"


def _workload(shapes) -> str:
    """What the table timed: a decode step's workload, or the batch's shapes."""
    if isinstance(shapes, dict) and "workload" in shapes:
        return f"`{shapes['workload']}` (one generated token per step, KV cache of {shapes['kv_cache_tokens']} tokens)"
    if isinstance(shapes, dict):
        return "batch " + ", ".join(f"{k} {tuple(v) if isinstance(v, list) else v}" for k, v in shapes.items())
    return f"batch {tuple(shapes)}" if shapes else "batch ?"


def _deployed_fixed(deployed: dict | None) -> list[str]:
    """How the table took its fixed cost from the deployed model, where it did."""
    if not deployed:
        return []
    if "whole_blocks" not in deployed:
        return [f"The time outside the units is the model as deployed with every unit at its dense option (in its format, "
                f"with the fusions `convert` applies: {deployed['reference_model'] * 1e3:.2f} ms) less those options' times.", ""]
    blocks = deployed["whole_blocks"]
    return [f"The runtime runs {len(blocks)} blocks whole (e.g. `{next(iter(blocks))}`); their units were timed inside them, "
            f"against the block with every unit empty, and the time outside the units is the deployed model with those "
            f"units empty ({deployed['emptied_model'] * 1e3:.2f} ms) less the other units' dense times.", ""]


def _dense_blocks(blocks: dict[str, dict]) -> list[str]:
    """Blocks a profile may leave dense and unfused, where torch runs them faster than the fused kernel at 0%."""
    if not blocks:
        return []
    name, block = next(iter(blocks.items()))
    return [f"{len(blocks)} fused blocks run faster left dense in torch than fused with their units at 0% (e.g. `{name}`: "
            f"{block['time'] * 1e3:.2f} ms over the empty block, against {len(block['units'])} units); the solver may keep "
            f"any of them dense and unfused.", ""]


def _calibration(fit: dict | None) -> list[str]:
    """How the table was fitted to the deployed runtime, when it was."""
    if not fit:
        return []
    if "skipped" in fit:
        return [f"The table was not calibrated to the deployed runtime: {fit['skipped']}.", ""]
    return [f"The table was calibrated to the deployed runtime on {len(fit['points'])} profiles run end to end: the time outside "
            f"the units {fit['fixed_before'] * 1e3:.2f} -> {fit['fixed'] * 1e3:.2f} ms, unit times x{fit['scale']:.3f}; its largest "
            f"error on those profiles {fit['max_error_before']:.1%} -> {fit['max_error_after']:.1%}.", ""]


def _rounds(profiles: dict, target: float, baseline: str) -> list[str]:
    """The closed loop's rounds per method (``profiles[m]["rounds"]``), when the summary has them."""
    rows = [(m, i, r) for m, p in profiles.items() for i, r in enumerate(p.get("rounds") or [], 1)]
    if not rows:
        return []
    lines = ["## Closed loop", "",
             f"Each round solves the table for a target and verifies; a measured / target outside the accepted band "
             f"asks the table for a corrected target. Speedups over {baseline}.", "",
             "| method | round | target for the table | predicted | measured | measured / target |", "|---|---|---|---|---|---|"]
    for method, i, r in rows:
        measured = r.get("measured")
        lines.append(f"| {method} | {i} | {_fmt(r.get('target_for_table'))} | {_fmt(r.get('predicted'))} | {_fmt(measured)} "
                     f"| {'n/a' if measured is None else f'{measured / target:.3f}'} |")
    return lines + [""]


def _convergence(profiles: dict) -> list[str]:
    """One line per search: where its loss ended, what it cost, and how soon it got close."""
    lines = []
    for method, p in profiles.items():
        c = p.get("convergence")
        if not c:
            continue
        final, seconds = c["loss"][-1], c.get("total_seconds")
        close = next(t for t, loss in zip(c["seconds"], c["loss"]) if loss <= final * 1.01)
        n = c["total_evaluations"]
        cost = f"{n} candidate{'s' if n != 1 else ''}" + (f", {c['batch_evaluations'][-1]} batch passes by the last improvement"
                                                        if c.get("batch_evaluations") and c["batch_evaluations"][-1] is not None else "")
        budget = c.get("budget")
        stop = ("" if budget is None else f"; budget {budget:g} s, " + ("which stopped it" if c.get("stopped_by_budget") else "not reached"))
        lines.append(f"Search convergence ({method}): best calibration loss {final:.5g} after {cost} in {_fmt(seconds)} s; "
                     f"within 1% of it after {close:.0f} s{stop}.")
    return lines + ["", "![convergence](plots/convergence.png)", ""] if lines else []


def _validation(profiles: dict) -> list[str]:
    """How the validation split chose among each search's finalists: an overfit search shows as a pick
    other than its best calibration loss, or as validation losses well above calibration ones."""
    lines = []
    for method, p in profiles.items():
        finalists, picked = p.get("validation") or [], p.get("picked")
        if len(finalists) < 2 or picked is None:
            continue
        lines.append(f"Validation pick ({method}): of its {len(finalists)} best profiles on calibration data (calibration loss "
                     f"{finalists[0]['calibration_loss']:.5g} to {finalists[-1]['calibration_loss']:.5g}), number {picked + 1} did best on "
                     f"validation data ({finalists[picked]['validation_loss']:.5g}; the calibration-best had {finalists[0]['validation_loss']:.5g}).")
    return lines + [""] if lines else []


def _shrunk(shrink: dict | None, table: TimingTable) -> list[str]:
    """A mixed profile's first stage: what the structured run kept and measured, and where its own report is."""
    if not shrink:
        return []
    resized = shrink["structure"]
    return [f"**Shrunk first, then pruned.** A structured profile for {shrink['target']:g}x measured {shrink['measured_speedup']:.3f}x "
            f"over dense torch ({len(resized)} blocks resized, e.g. " + ", ".join(f"`{n}` keeps {k}" for n, k in list(resized.items())[:3])
            + f"); its run and report are in `{shrink['work_dir']}`. Unpruned, the smaller model runs {table.reference_speedup:.3f}x "
            "faster than the original; every speedup and loss here is over the original.", ""]


def _kept_dense(kept: dict | None) -> list[str]:
    """Layers that look prunable but stay dense, grouped by reason."""
    if not kept:
        return []
    by_reason: dict[str, list[str]] = {}
    for name, why in kept.items():
        by_reason.setdefault(why.split(" (")[0] if "convolution (groups=" in why else why, []).append(name)
    parts = [f"{len(names)} x {why} (e.g. `{names[0]}`)" for why, names in by_reason.items()]
    return [f"{len(kept)} layers stay dense in every profile, their time part of the fixed cost: " + "; ".join(parts) + ".", ""]


def _curve(summary: dict, plotted: bool) -> list[str]:
    """The speed/quality curve first: what each target bought and cost, and why one was exported."""
    curve, choice = summary.get("curve") or [], summary.get("choice") or {}
    if len({p["target"] for p in curve}) < 2:
        return [f"Choice: {choice['why']}.", ""] if choice.get("why") else []
    lines = ["## Speed against quality", "", f"Exported: **{summary['target']:g}x**, {choice.get('why', '')}. Any other point: "
             f"`spdy export WORK_DIR --target T --method M`.", ""]
    if plotted:
        lines += ["![curve](plots/curve.png)", ""]
    lines += [f"| target | method | measured speedup | quality loss | calibration loss | validation loss | held-out loss |", "|---|---|---|---|---|---|---|"]
    for p in curve:
        lines.append(f"| {p['target']:g} | {p['method']} | {_fmt(p['measured_speedup'])} | {_fmt(p.get('quality_loss'))} "
                     f"| {_fmt(p.get('calibration_loss'))} | {_fmt(p.get('validation_loss'))} | {_fmt(p.get('heldout_loss'))} |")
    return lines + ["", f"Quality loss: {choice.get('quality_loss_is', 'n/a')}. Losses: the search's (`{summary.get('search_loss', summary['loss'])}`) "
                    "on calibration, validation and held-out data.", ""]


def _quality(profiles: dict) -> list[str]:
    """Held-out quality of each method's profile in the model's own terms (`spdy.quality`)."""
    rows = {m: p["quality"] for m, p in profiles.items() if p.get("quality")}
    if not rows:
        return []
    names = list(dict.fromkeys(k for q in rows.values() for k in q))
    lines = ["### Held-out quality against the dense model", "",
             "| method | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m} | " + " | ".join(_fmt(q.get(n)) for n in names) + " |" for m, q in rows.items()]
    return lines + [""]


def write_report(work: str | Path) -> tuple[Path, Path]:
    """Render ``report.md`` and ``report.html`` from ``work/summary.json``."""
    work = Path(work)
    path = work / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{work} has no summary.json: run `spdy run --work-dir {work}` first")
    summary = json.loads(path.read_text())
    table = TimingTable.load(summary["timings"])
    plots = _plots(summary, table, work / "plots")
    main = summary["profiles"][summary["method"]]
    target, baseline = summary["target"], _baseline(summary)
    engine_column = any(p.get("verify", {}).get("speedup_over_engine_dense") is not None for p in summary["profiles"].values())
    lines = [
        f"# spdy report: {summary['model']} at {target:g}x over {baseline}",
        "",
        *_headline(main.get("verify", {}), main["predicted_speedup"], target),
        "",
        *_curve(summary, "curve" in plots),
        f"Maximum attainable on this table: {table.max_speedup():.3f}x over {baseline}.",
        "",
        f"Engine `{summary['engine']}`, {_device(table.meta)}; "
        f"workload {_workload(table.meta.get('batch_shapes'))}; dense model {table.base * 1e3:.2f} ms, of which {table.fixed * 1e3:.2f} ms is outside the {len(table.units)} pruned units. "
        f"Pruner `{summary['pruner']}`, pattern `{summary['pattern']}`, the model's loss `{summary['loss']}`, the search's "
        f"`{summary.get('search_loss', summary['loss'])}`.",
        "",
        *_deployed_fixed(table.meta.get("deployed_fixed")),
        *_dense_blocks(table.dense_blocks),
        *_calibration(table.meta.get("calibration")),
        *_kept_dense(table.meta.get("kept_dense")),
        *_shrunk(summary.get("shrink"), table),
        *([f"Finished with global AdaPrune ({summary['gap']['gap']['epochs']} epochs, lr {summary['gap']['gap']['lr']:g}): "
           f"held-out loss {summary['gap']['heldout_before_gap']:.5g} -> {summary['gap']['heldout_after_gap']:.5g}.", ""]
          if summary.get("gap") else []),
        "## Methods at the same target",
        "",
        f"| method | predicted speedup over {baseline} | measured speedup over {baseline} | measured / target "
        f"|{f' measured speedup over {ENGINE_DENSE} |' if engine_column else ''} calibration loss | validation loss | held-out loss "
        "| evaluations | search time (s) |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if engine_column else ""),
    ]
    for method, p in summary["profiles"].items():
        pv = p.get("verify", {})
        measured = pv.get("measured_speedup")
        engine = f" {_fmt(pv.get('speedup_over_engine_dense'))} |" if engine_column else ""
        lines.append(f"| {method} | {p['predicted_speedup']:.4f} | {_fmt(measured)} | {'n/a' if measured is None else f'{measured / target:.3f}'} "
                     f"|{engine} {_fmt(p.get('calibration_loss'))} | {_fmt(p.get('validation_loss'))} | {_fmt(p.get('heldout_loss'))} "
                     f"| {p.get('evaluations', '')} "
                     f"| {_fmt(p.get('seconds'))} |")
    lines += ["", "![speedup and quality](plots/speedup_quality.png)", "", *_quality(summary["profiles"]), *_validation(summary["profiles"]),
              *_convergence(summary["profiles"]),
              *_rounds(summary["profiles"], target, baseline), "## Profile", "",
              "![profile](plots/profile.png)", "", "## Timings", "", "![timings](plots/timings.png)", "",
              "## Stages", "", "| stage | seconds | detail |", "|---|---|---|"]
    for stage, info in summary.get("stages", {}).items():
        detail = ", ".join(f"{k}={v}" for k, v in info.items() if k != "seconds")
        lines.append(f"| {stage} | {info['seconds']} | {detail} |")
    lines += ["", "## Reproduce", "", "```", *summary.get("commands", []), "```", ""]
    md = "\n".join(lines)
    md_path = work / "report.md"
    md_path.write_text(md)
    html_path = work / "report.html"
    html_path.write_text(_html(md, work))
    return md_path, html_path


def _html(md: str, work: Path) -> str:
    """A small Markdown subset to HTML with images inlined, so the file stands alone."""
    body, in_table, in_code = [], False, False
    for line in md.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            data = base64.b64encode((work / src).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(src)}" src="data:image/png;base64,{data}" style="max-width:100%"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>spdy report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _inline(text: str) -> str:
    out = html.escape(text)
    while "**" in out:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    while out.count("`") >= 2:
        out = out.replace("`", "<code>", 1).replace("`", "</code>", 1)
    return out
