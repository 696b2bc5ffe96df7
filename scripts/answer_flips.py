#!/usr/bin/env python
"""Where does SCD change the consumer's answer? Per held-out ToMi item: KL to the oracle at the
first answer token, the oracle's own top-1 - top-2 probability margin there, and whether the
rebuilt cache flips the top-1 token. Prints a table by oracle margin (a near-tie flips on a
tiny error) and the KL tail; then the serving gate's trade-off from the same pass: prefilling
the items whose rebuilt distribution is least sure, by each candidate signal (the rebuilt
top-1 - top-2 margin that `launch --min-margin` uses, the rebuilt top-1 probability, its
entropy; the oracle's own margin as an unreachable reference), what share prefilled buys in mean
KL and first-token flips. --json writes one line per margin bucket, a summary line and one per
gate point, with config, git SHA and machine.

  python scripts/answer_flips.py --n 500 --json out/answer_flips.jsonl
"""

from __future__ import annotations

import argparse

from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.evaluation.flips import GATE_SIGNALS, gate_curve, item_row, summarize
from sgl_scd.evaluation.methods import scd_method
from sgl_scd.hf.scd import load_with_models
from sgl_scd.runinfo import write_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="held-out ToMi test items (default 500)")
    p.add_argument("--consumer", default="demo-ft", help="consumer spec (default demo-ft)")
    p.add_argument("--adapter", help="adapter directory (default adapters/<consumer>)")
    p.add_argument("--json", help="write JSON lines here")
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    producer, consumer, adapter = load_with_models(args.consumer, args.adapter)
    rows: list[dict] = []
    evaluate.evaluate(producer, consumer, data.load_tomi("test")[: args.n], {"scd": scd_method(adapter)},
                      max_new_tokens=8, desc="answer flips", on_item=lambda pi, outs: rows.append(item_row(pi, outs)))
    summary = summarize(rows)
    print("| oracle top-1 - top-2 | items | flips | flip rate | mean KL |\n|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['bucket']} | {s['items']} | {s['flips']} | {s['flip_rate']:.2f} | {s['mean_kl']:.3f} |")
    tail = summary[-1]
    print(f"median KL {tail['median_kl']:.3f}; the top 5% of items carry {tail['top5pct_kl_share']:.0%} of the mean")
    gates = [g for signal in GATE_SIGNALS for g in gate_curve(rows, signal)]
    print("\n| gate signal | prefilled | mean KL | flip rate |\n|---|---|---|---|")
    for g in gates:
        print(f"| {g['signal']} | {g['prefilled']:.2f} | {g['mean_kl']:.3f} | {g['flip_rate']:.3f} |")
    if args.json:
        write_jsonl(args.json, summary + gates, vars(args))


if __name__ == "__main__":
    main()
