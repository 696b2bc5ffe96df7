"""A bench_shared_prefix run read back: its table, its targets, its plot."""

from __future__ import annotations

import math
from pathlib import Path

from sgl_scd.evaluation.plotstyle import family, method_color, split_variant

MARKERS = "os^Dv<>"
# The targets of a shared-prefix run (ungated SCD, every consumer): (same answer >=, KL <=) per set.
QUALITY_TARGETS = {"tomi": (0.95, 0.05), "hitom": (0.90, 0.10), "long": (0.90, 0.10)}
PAYLOAD_TARGET = 0.25  # x raw bf16 KV of the reused tokens
GATE_TARGET = (0.98, 0.15)  # gated same answer >=, share of requests prefilled <=
REUSE_BASELINES = ("raw_kv_rerot", "droidspeak")  # SCD must beat each in KL at <= their payload


def _method_rows(rows: list[dict]) -> list[dict]:
    """The rows of methods (the oracle's own rows and the gate choice left out)."""
    return [r for r in rows if r["method"] not in ("oracle", "gate_choice")]


def _cells(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """{(set, consumer): {method: row}}, in run order."""
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["set"], r["consumer"]), {})[r["method"]] = r
    return cells


def table(rows: list[dict]) -> str:
    """Markdown, one row per (set, consumer, method), in run order; the gate choice rows skipped."""
    head = ["set", "consumer", "method", "n", "F1 / oracle F1", "same answer (+-se)", "KL", "KL ans", "top-1",
            "sure: share, same", "reused", "payload/raw", "(rebuild+suffix)/prefill", "prefilled"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _method_rows(rows):
        method = r["method"] + (f" (M={r['min_margin']:g})" if r.get("min_margin") else "")
        f1 = r.get("f1_over_oracle", math.nan)
        sure = r.get("same_answer_sure", math.nan)
        out.append("| " + " | ".join([
            r["set"], r["consumer"], method, str(r["n"]),
            "n/a (oracle F1 0)" if math.isnan(f1) else f"{f1:.2f}",
            f"{r['same_answer']:.3f} +-{r['same_answer_se']:.3f}", f"{r['kl']:.3f}",
            f"{r.get('kl_answer', math.nan):.3f}", f"{r['top1']:.2f}",
            f"{r.get('sure_fraction', math.nan):.2f}, " + ("-" if math.isnan(sure) else f"{sure:.2f}"),
            f"{r['reused_fraction']:.2f}", f"{r['payload_ratio']:.3f}", f"{r['compute_ratio']:.3f}",
            f"{r['prefilled']:.2f}"]) + " |")
    return "\n".join(out)


def pivot(rows: list[dict]) -> str:
    """Markdown, one row per (set, consumer), one column per method: "KL / same answer"; the
    methods' payloads in the header."""
    rows = _method_rows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    payload = {r["method"]: r["payload_ratio"] for r in rows}
    head = ["set", "consumer", *(f"{m} ({payload[m]:.2f}x)" for m in methods)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (s, consumer), by in _cells(rows).items():
        out.append("| " + " | ".join([s, consumer, *(
            f"{by[m]['kl']:.3f} / {by[m]['same_answer']:.2f}" + (f" (M={by[m]['min_margin']:g}, {by[m]['prefilled']:.0%} prefilled)"
                                                                 if by[m].get("min_margin") else "")
            if m in by else "-" for m in methods)]) + " |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[dict]:
    """Each target checked per (set, consumer): {set, consumer, target, value, met}."""
    out = []
    for (s, consumer), by in _cells(_method_rows(rows)).items():
        scd = by.get("scd")
        if scd is None:
            continue
        same, kl = QUALITY_TARGETS[s]
        checks = [(f"scd same answer >= {same}", f"{scd['same_answer']:.3f} +-{scd['same_answer_se']:.3f}",
                   scd["same_answer"] >= same),
                  (f"scd KL <= {kl}", f"{scd['kl']:.3f}", scd["kl"] <= kl),
                  (f"scd payload <= {PAYLOAD_TARGET}x", f"{scd['payload_ratio']:.3f}",
                   scd["payload_ratio"] <= PAYLOAD_TARGET)]
        rivals = [r for m, r in by.items() if family(m) in REUSE_BASELINES]
        if rivals:
            best = min(rivals, key=lambda r: r["kl"])
            checks.append(("scd KL < re-rotated raw KV and every DroidSpeak width, at <= payload",
                           f"{scd['kl']:.3f} vs {best['kl']:.3f} ({best['method']})",
                           all(scd["kl"] < r["kl"] and scd["payload_ratio"] <= r["payload_ratio"] for r in rivals)))
        gate = by.get("scd_gate")
        if gate is not None:
            checks.append((f"gated same answer >= {GATE_TARGET[0]}, prefilled <= {GATE_TARGET[1]}",
                           f"{gate['same_answer']:.3f}, {gate['prefilled']:.2f} (M={gate['min_margin']:g})",
                           gate["same_answer"] >= GATE_TARGET[0] and gate["prefilled"] <= GATE_TARGET[1]))
        out += [{"set": s, "consumer": consumer, "target": t, "value": v, "met": bool(m)} for t, v, m in checks]
    return out


def targets_table(rows: list[dict]) -> str:
    checks = targets(rows)
    out = ["| set | consumer | target | measured | met |", "|---|---|---|---|---|"]
    out += [f"| {c['set']} | {c['consumer']} | {c['target']} | {c['value']} | {'yes' if c['met'] else 'no'} |"
            for c in checks]
    met = sum(c["met"] for c in checks)
    return "\n".join(out) + f"\n\n{met} of {len(checks)} targets met."


def plot(rows: list[dict], out: Path) -> None:
    """A PNG, one column per set: KL (top) and same answer (bottom) against payload; colour is the
    method, marker the consumer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _method_rows(rows)
    sets = list(dict.fromkeys(r["set"] for r in rows))
    consumers = list(dict.fromkeys(r["consumer"] for r in rows))
    fig, axes = plt.subplots(2, len(sets), figsize=(4.0 * len(sets), 6.4), squeeze=False)
    for j, s in enumerate(sets):
        for r in (r for r in rows if r["set"] == s):
            marker = MARKERS[consumers.index(r["consumer"]) % len(MARKERS)]
            setting = split_variant(r["method"])[1]
            for i, y in enumerate((r["kl"] + 1e-3, r["same_answer"])):
                axes[i][j].scatter(r["payload_ratio"], y, color=method_color(r["method"]), marker=marker, s=36,
                                   label=r["method"])
                if setting:  # a window width or a page count: written by the point
                    axes[i][j].annotate(setting, (r["payload_ratio"], y), fontsize=6, xytext=(2, 3),
                                        textcoords="offset points")
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(s, fontsize=9)
        axes[1][j].set_xlabel("payload / raw bf16 KV of the reused tokens", fontsize=8)
        axes[1][j].set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("first-token KL vs the adapter's prefill + 1e-3", fontsize=8)
    axes[1][0].set_ylabel("same answer as the adapter's prefill", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    by_family = {family(r["method"]): method_color(r["method"]) for r in rows}
    handles = [plt.Line2D([], [], color=c, marker="o", ls="") for c in by_family.values()]
    handles += [plt.Line2D([], [], color="0.3", marker=MARKERS[i % len(MARKERS)], ls="") for i in range(len(consumers))]
    fig.legend(handles, [*by_family, *consumers], loc="upper center", ncol=min(6, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.90))
    fig.savefig(out, dpi=110)
    plt.close(fig)
