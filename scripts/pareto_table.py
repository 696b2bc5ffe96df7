#!/usr/bin/env python
"""Markdown table of a bench_pareto.py run (one row per dataset and method).

  python scripts/pareto_table.py out/pareto.jsonl [--bandwidths 1,25,200]

Columns: F1 and F1 / oracle F1, KL vs the oracle (first answer token; "KL ans": summed over the
answer's later tokens where the first agrees, quality.answer_kl), top-1 and same-answer agreement, payload
relative to raw bf16 KV, (rebuild + suffix forward) / oracle prefill (the gate's fallback
prefills included), the fraction of requests the gate prefilled, rebuild time, TTFT at the
chosen bandwidths, and whether the method is on the quality-TTFT Pareto frontier at every
bandwidth <= 200 Gbps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sgl_scd.evaluation.pareto import table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path, help="bench_pareto.py --json output")
    p.add_argument("--bandwidths", default="1,25,200", help="TTFT columns, Gbps (default 1,25,200)")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{args.jsonl}: no rows")
    print(table(rows, [b.strip() for b in args.bandwidths.split(",") if b.strip()]))


if __name__ == "__main__":
    main()
