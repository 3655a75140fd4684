"""The `spdy` command line: one subcommand per pipeline stage.

Exit status: 0 success, 1 runtime failure, 2 bad input (including an infeasible target).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from spdy.dp import DEFAULT_BUCKETS, InfeasibleTarget, solve
from spdy.levels import Option
from spdy.timing.table import TimingFormatError, TimingTable


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit status 2."""


def _load_errors(path: str, table: TimingTable) -> dict[str, dict[str, float]]:
    """Read ``unit -> {sparsity or option key: error}``; keys are normalised to option keys."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--errors: file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--errors {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--errors {path}: expected an object unit -> {{sparsity: error}}")
    errors = {}
    for unit, levels in data.items():
        if unit not in table.times:
            raise UsageError(f"--errors {path}: unknown unit {unit!r}; the timing table's units are e.g. {table.units[:3]}")
        if not isinstance(levels, dict):
            raise UsageError(f"--errors {path}: unit {unit!r}: expected {{sparsity: error}}")
        errors[unit] = {}
        for level, err in levels.items():
            try:
                key = Option.parse(str(level)).key
            except ValueError as e:
                raise UsageError(f"--errors {path}: unit {unit!r}: {e}") from None
            if isinstance(err, bool) or not isinstance(err, (int, float)) or err != err:
                raise UsageError(f"--errors {path}: unit {unit!r} level {level}: error must be a number, got {err!r}")
            errors[unit][key] = float(err)
    missing = [u for u in table.units if u not in errors]
    if missing:
        raise UsageError(f"--errors {path}: no errors for units {missing[:5]} (exclude them with --exclude, or add them)")
    return errors


def cmd_solve(args: argparse.Namespace) -> int:
    try:
        table = TimingTable.load(args.timings, exclude=args.exclude or ())
    except (TimingFormatError, FileNotFoundError, KeyError) as e:
        raise UsageError(str(e).strip('"')) from None
    errors = _load_errors(args.errors, table) if args.errors else None
    solution = solve(table, args.target, errors, buckets=args.buckets)
    if args.json:
        print(json.dumps({
            "target": args.target,
            "budget": solution.budget,
            "predicted_time": solution.predicted_time,
            "predicted_speedup": solution.predicted_speedup,
            "max_speedup": solution.max_speedup,
            "total_error": solution.total_error,
            "profile": solution.sparsities(),
        }, indent=1))
        return 0
    width = max(len(u) for u in table.units)
    print(f"{'unit':<{width}}  sparsity  time (ms)  dense (ms)")
    for unit, key in solution.profile.items():
        print(f"{unit:<{width}}  {key:>8}  {table.times[unit][key] * 1e3:9.3f}  {table.dense_time(unit) * 1e3:10.3f}")
    print(f"\ntarget {args.target:g}x: predicted speedup {solution.predicted_speedup:.4f}x "
          f"({solution.predicted_time * 1e3:.3f} ms of {table.base * 1e3:.3f} ms dense; fixed {table.fixed * 1e3:.3f} ms)")
    print(f"maximum attainable speedup on this table: {solution.max_speedup:.4f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spdy", description="Prune a model to a target speedup measured on a real engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("solve", help="exact DP: least-error profile meeting a target speedup on a timing table")
    p.add_argument("timings", metavar="TIMINGS", help="timing table: spdy JSON or the SPDY reference text format")
    p.add_argument("--target", type=float, required=True, help="target speedup over the dense model, e.g. 2.0")
    p.add_argument("--errors", metavar="FILE", help="JSON unit -> {sparsity: error}; default: the SPDY prior (i/(n-1))^2")
    p.add_argument("--exclude", nargs="+", metavar="NAME", help="units kept dense and out of the solver (their time counts as fixed)")
    p.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS, help="time resolution of the DP (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.set_defaults(func=cmd_solve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except InfeasibleTarget as e:
        print(f"spdy {args.command}: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": "infeasible", "target": e.target, "max_speedup": e.max_speedup}))
        return 2
    except UsageError as e:
        print(f"spdy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spdy {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
