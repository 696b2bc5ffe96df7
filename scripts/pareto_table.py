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


def table(rows: list[dict], bandwidths: list[str]) -> str:
    ans = any("kl_answer" in r for r in rows)  # runs before quality.answer_kl lack it
    head = (["set", "method", "n", "F1", "F1/oracle", "KL"] + ["KL ans"] * ans
            + ["top-1", "same", "payload/raw", "(rebuild+suffix)/prefill", "prefilled", "rebuild"]
            + [f"TTFT@{bw}" for bw in bandwidths] + ["Pareto@<=200"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    oracle_f1 = {r["dataset"]: r["f1"] for r in rows if r["method"] == "oracle"}
    for r in rows:
        ref = oracle_f1.get(r["dataset"]) or float("nan")
        front = all(v for bw, v in r["on_pareto"].items() if int(bw) <= 200)
        cells = [r["dataset"], r["method"], str(r["n"]), f"{r['f1']:.3f}", f"{r['f1'] / ref:.2f}", f"{r['kl']:.3f}"]
        cells += [f"{r.get('kl_answer', float('nan')):.3f}"] * ans
        cells += [f"{r['top1']:.2f}", f"{r['same_answer']:.2f}", f"{r['payload_ratio']:.3f}",
                  f"{r['compute_ratio_vs_prefill']:.3f}", f"{r.get('fallback_rate', 0.0):.2f}",
                  f"{r['rebuild_s'] * 1e3:.0f} ms"]
        cells += [f"{r['ttft_s'][bw] * 1e3:.0f} ms" for bw in bandwidths]
        out.append("| " + " | ".join(cells + ["yes" if front else "no"]) + " |")
    return "\n".join(out)


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
