"""Regenerate the markdown tables and plots from results CSVs.

    python benchmarks/plot_results.py [--out DIR] [--no-plots] [CSV ...]

Default: every CSV under benchmarks/results/ but those `python -m tools.perf` writes there beside its own
tables (model-*.csv, static-*.csv, traffic.csv: not benchmark rows). Each CSV gets ``<stem>.md`` and
``<stem>-{time,speedup,bandwidth}-<dtype>.png`` (no bandwidth for `bench --backward`'s rows, which count no bytes)
beside it (or in --out), built from the CSV alone by vstar_kernels.bench.report.render, so committed results can
be re-rendered anywhere. A speculation-*.csv (benchmarks/speculation.py's rows) gets its markdown and, for plots,
that script's one picture, ``<stem>-flag-rates.png``. A file given twice is rendered once; with --out, two files
of one name (their outputs would overwrite each other there) are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# What `python -m tools.perf` writes into benchmarks/results/ beside its own markdown (model, static, traffic):
# not benchmark rows.
PERF_OUTPUTS = ("model-*.csv", "static-*.csv", "traffic.csv")


def _speculation_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speculation", ROOT / "benchmarks" / "speculation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", help="results CSVs (default: every results CSV in benchmarks/results)")
    parser.add_argument("--out", metavar="DIR", help="write the tables and plots here (default: beside each CSV)")
    parser.add_argument("--no-plots", action="store_true", help="markdown tables only")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # a checkout that is not pip-installed
    from vstar_kernels.bench.report import render

    from vstar_kernels.bench import results_folder

    paths = [Path(p) for p in args.csv] or [p for p in sorted(RESULTS.glob("*.csv"))
                                            if not any(p.match(pattern) for pattern in PERF_OUTPUTS)]
    once = {}
    for p in paths:
        once.setdefault(p.resolve(), p)  # a file given twice (or by two spellings of its path): rendered once
    paths = list(once.values())
    if not paths:
        print(f"no CSV files given and none in {RESULTS}", file=sys.stderr)
        return 1
    missing = [f"{p} ({'a folder' if p.is_dir() else 'no such file'})" for p in paths if not p.is_file()]
    if missing:
        print(f"not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.out:
        # outputs are named by the CSV's stem: two of one stem in one folder, the second overwrote the first
        stems = {}
        for p in paths:
            stems.setdefault(p.stem, []).append(str(p))
        clashes = [" and ".join(same) for same in stems.values() if len(same) > 1]
        if clashes:
            print(f"--out: {'; '.join(clashes)}: files of one name, whose tables and plots would overwrite each "
                  f"other in {args.out}: render them into separate folders", file=sys.stderr)
            return 2
        try:
            args.out = results_folder(args.out)  # an existing file, or a file where a folder is to be made: by name
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except (argparse.ArgumentTypeError, OSError) as exc:
            print(f"--out: {exc}", file=sys.stderr)
            return 2
    for path in paths:
        speculation = path.name.startswith("speculation-")
        try:
            written = render(path, plots=not (args.no_plots or speculation), out_dir=args.out)
            if speculation and not args.no_plots:
                written += [p for p in [_speculation_script().plot(path, args.out)] if p]
        except ValueError as exc:  # not a results file of this harness (a UnicodeDecodeError too)
            print(exc if str(path) in str(exc) else f"{path}: {exc}", file=sys.stderr)
            return 2
        if not written:
            print(f"{path}: no rows (an empty file, or its header alone)", file=sys.stderr)
            return 2
        for out in written:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
