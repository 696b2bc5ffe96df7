#!/usr/bin/env python
"""Markdown tables and a plot of bench_shared_prefix.py runs.

  python scripts/shared_prefix_table.py out/shared_prefix.jsonl out/shared_prefix_long.jsonl --plot out/shared_prefix.png

Prints one row per (set, consumer, method) in run order, columns as bench_shared_prefix.py's
docstring defines them (--pivot: one row per set and consumer, "KL / same answer" per method),
then each target checked per set and consumer: ungated SCD's same answer and KL, its payload,
SCD against re-rotated raw KV and every DroidSpeak width, and the gate.
--plot writes KL and same answer against payload, one column per set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sgl_scd.evaluation.shared_prefix import pivot, plot, table, targets_table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path, nargs="+", help="bench_shared_prefix.py --json output(s)")
    p.add_argument("--plot", type=Path, help="write a PNG here")
    p.add_argument("--pivot", action="store_true",
                   help="one row per set and adapter, one column per method (KL / same answer) instead of the long table")
    args = p.parse_args(argv)
    rows = []
    for path in args.jsonl:
        if not path.exists():
            p.error(f"{path}: no such file (run scripts/bench_shared_prefix.py --json {path} first)")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not any(r.get("method") not in (None, "gate_choice") for r in rows):
        p.error(f"{', '.join(map(str, args.jsonl))}: no method rows")
    splits = sorted({r["split"] for r in rows})
    print(f"split: {', '.join(splits)}; git {', '.join(sorted({r.get('git_sha', '?') for r in rows}))}\n")
    print(pivot(rows) if args.pivot else table(rows))
    print()
    print(targets_table(rows))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
