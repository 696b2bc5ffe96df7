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

import torch

from sgl_scd.codec.manifest import load_with_models
from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.evaluation.methods import scd_method
from sgl_scd.evaluation.quality import kl_divergence, top2_margin
from sgl_scd.runinfo import write_jsonl

BUCKETS = [(0.0, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 0.7), (0.7, 1.0)]
GATE_SHARES = (0.1, 0.2, 0.3, 0.4)
# gate signals, lowest = least sure = prefilled first; "margin" is the oracle's (not known when serving)
GATE_SIGNALS = ("scd_margin", "scd_top1_prob", "scd_neg_entropy", "margin")


def item_row(p: evaluate.PairItem, outs: dict) -> dict:
    oracle, scd = outs["oracle"].first_logits, outs["scd"].first_logits
    probs = torch.softmax(scd.double(), -1)
    return {"kl": kl_divergence(oracle, scd), "margin": top2_margin(oracle),
            "flip": int(oracle.argmax()) != int(scd.argmax()), "scd_margin": top2_margin(scd),
            "scd_top1_prob": float(probs.max()), "scd_neg_entropy": float((probs * probs.clamp_min(1e-30).log()).sum())}


def gate_curve(rows: list[dict], signal: str, shares=GATE_SHARES) -> list[dict]:
    """Prefill each share of the items with the lowest signal (a gate on that signal; a prefilled
    item is exact): the mean KL and first-token flip rate over all items that leaves."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][signal])
    out = []
    for share in shares:
        gated = set(order[: round(share * len(rows))])
        kept = [r for i, r in enumerate(rows) if i not in gated]
        out.append({"signal": signal, "prefilled": len(gated) / max(1, len(rows)),
                    "mean_kl": sum(r["kl"] for r in kept) / max(1, len(rows)),
                    "flip_rate": sum(r["flip"] for r in kept) / max(1, len(rows))})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for lo, hi in BUCKETS:
        b = [r for r in rows if lo <= r["margin"] < hi or (hi == 1.0 and r["margin"] == 1.0)]
        out.append({"bucket": f"[{lo}, {hi})", "items": len(b), "flips": sum(r["flip"] for r in b),
                    "flip_rate": sum(r["flip"] for r in b) / max(1, len(b)),
                    "mean_kl": sum(r["kl"] for r in b) / max(1, len(b))})
    kls = sorted((r["kl"] for r in rows), reverse=True)
    top = max(1, len(kls) // 20)
    out.append({"bucket": "all", "items": len(rows), "flips": sum(r["flip"] for r in rows),
                "flip_rate": sum(r["flip"] for r in rows) / max(1, len(rows)),
                "mean_kl": sum(kls) / max(1, len(kls)), "median_kl": kls[len(kls) // 2] if kls else 0.0,
                "top5pct_kl_share": sum(kls[:top]) / max(1e-12, sum(kls))})
    return out


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
