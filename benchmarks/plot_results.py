"""Regenerate the markdown tables and plots from results CSVs.

    python benchmarks/plot_results.py [CSV ...]    (default: every CSV under benchmarks/results/)

Each CSV gets ``<stem>.md`` and ``<stem>-{time,speedup,bandwidth}-<dtype>.png`` beside it,
built from the CSV alone (vstar_kernels.bench.report), so committed results can be
re-rendered anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", help="results CSVs (default: every CSV in benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true", help="markdown tables only")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # a checkout that is not pip-installed
    from vstar_kernels.bench import report

    paths = [Path(p) for p in args.csv] or sorted(RESULTS.glob("*.csv"))
    if not paths:
        print(f"no CSV files given and none in {RESULTS}", file=sys.stderr)
        return 1
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in paths:
        for out in report.render(path, plots=not args.no_plots):
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
