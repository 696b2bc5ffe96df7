"""The quality-TTFT frontier of a bench_pareto run: which methods are on it, its plot, its table."""

from __future__ import annotations

from pathlib import Path

from sgl_scd.evaluation.plotstyle import method_color, split_variant


def pareto(rows: list[dict], bw: int) -> set[str]:
    """Methods not dominated in (TTFT at bw, KL): no other is at least as good in both and better in one."""
    front = set()
    for r in rows:
        t, q = r["ttft_s"][str(bw)], r["kl"]
        if not any((o["ttft_s"][str(bw)] <= t and o["kl"] <= q) and (o["ttft_s"][str(bw)] < t or o["kl"] < q)
                   for o in rows if o is not r):
            front.add(r["method"])
    return front


def plot(rows_by_dataset: dict[str, list[dict]], bandwidths, out: Path) -> None:
    """A PNG grid (dataset x bandwidth) of KL against TTFT, the frontier dashed (rows need on_pareto)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows_by_dataset)
    fig, axes = plt.subplots(len(names), len(bandwidths), figsize=(3.2 * len(bandwidths), 3.0 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, bw in enumerate(bandwidths):
            ax = axes[i][j]
            rows = rows_by_dataset[name]
            front = sorted((r for r in rows if r["on_pareto"][str(bw)]), key=lambda r: r["ttft_s"][str(bw)])
            ax.plot([r["ttft_s"][str(bw)] * 1e3 for r in front], [r["kl"] + 1e-3 for r in front], "--",
                    color="0.6", zorder=1)
            for r in rows:
                family, setting = split_variant(r["method"])
                ax.scatter(r["ttft_s"][str(bw)] * 1e3, r["kl"] + 1e-3, color=method_color(r["method"]),
                           label=family, zorder=2, s=40)
                if setting:  # one legend entry per family; the points carry their setting
                    ax.annotate(setting, (r["ttft_s"][str(bw)] * 1e3, r["kl"] + 1e-3), fontsize=6,
                                xytext=(2, 3), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_title(f"{name} @ {bw} Gbps", fontsize=9)
            ax.set_xlabel("TTFT (ms)", fontsize=8)
            if j == 0:
                ax.set_ylabel("KL vs oracle + 1e-3", fontsize=8)
            ax.tick_params(labelsize=7)
    legend = dict(zip(*reversed(axes[0][0].get_legend_handles_labels())))  # label -> handle, deduplicated
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(rows: list[dict], bandwidths: list[str]) -> str:
    """Markdown, one row per (dataset, method); TTFT columns at these bandwidths (Gbps, as strings)."""
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
