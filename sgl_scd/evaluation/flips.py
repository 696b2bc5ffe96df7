"""Where SCD flips the consumer's answer: per-item KL, margins and flips, bucketed by the oracle's
top-1 - top-2 margin, and the serving gate's trade-off (share prefilled vs mean KL and flips)."""

from __future__ import annotations

import torch

from sgl_scd.evaluation.evaluate import PairItem
from sgl_scd.evaluation.quality import kl_divergence, top2_margin

BUCKETS = [(0.0, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 0.7), (0.7, 1.0)]
GATE_SHARES = (0.1, 0.2, 0.3, 0.4)
# gate signals, lowest = least sure = prefilled first; "margin" is the oracle's (not known when serving)
GATE_SIGNALS = ("scd_margin", "scd_top1_prob", "scd_neg_entropy", "margin")


def item_row(p: PairItem, outs: dict) -> dict:
    """One item's KL to the oracle, both margins, whether the top-1 flips, and the gate signals."""
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
    """Items, flips and mean KL per oracle-margin bucket, then an "all" row with the KL tail."""
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
