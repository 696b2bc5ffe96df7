#!/usr/bin/env python
"""Quality vs time-to-first-token of cross-model KV reuse, every method in one run.

Methods: oracle (consumer prefill), raw_kv, kivi4, droidspeak, scd_reuse (SCD without patches,
producer side = K/V pages only, what SGLang always exposes), scd (with patch layers), scd_tailN
(scd, the last N prompt tokens prefilled by the consumer), scd_gateM (scd, prefilling instead
where the rebuilt first answer token's top-1 - top-2 probability is below M: the serving gate,
launch --min-margin).
TTFT(bw) = payload / bandwidth + measured rebuild + measured suffix forward (oracle: its prefill).
One JSON line per (dataset, method) to --json, plus a PNG of the quality-TTFT frontier.

  python scripts/bench_pareto.py --n 500 --json out/pareto.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from sgl_scd.codec.manifest import load_adapter, raw_kv_bytes_per_token
from sgl_scd.demo import data
from sgl_scd.evaluation import baselines, evaluate
from sgl_scd.evaluation.methods import scd_method
from sgl_scd.evaluation.pareto import pareto, plot
from sgl_scd.hf import models
from sgl_scd.hf.scd import adapter_dir, check_models
from sgl_scd.runinfo import provenance

BANDWIDTHS = (1, 10, 25, 100, 200, 400)


def log(msg: str) -> None:
    print(f"[bench_pareto] {msg}", file=sys.stderr, flush=True)


def run_dataset(name, items, producer, consumer, methods, bandwidths, raw_per_token, max_new_tokens) -> list[dict]:
    timing = defaultdict(lambda: defaultdict(list))

    def on_item(p, outs):
        oracle_s = outs["oracle"].forward_s
        for m, out in outs.items():
            t = timing[m]
            tokens = out.timings.get("tokens", len(p.ids) - 1)
            payload = out.timings.get("payload_bytes", 0.0 if m == "oracle" else raw_per_token * tokens)
            t["payload"].append(payload)
            t["tokens"].append(tokens)
            t["rebuild"].append(out.timings.get("rebuild_s", 0.0))
            t["forward"].append(out.forward_s)
            t["oracle"].append(oracle_s)
            t["prompt_tokens"].append(len(p.ids))
            t["fell_back"].append(out.fell_back)

    rows = evaluate.evaluate(producer, consumer, items, methods, desc=f"{name}", on_item=on_item,
                             max_new_tokens=max_new_tokens)
    mean = lambda xs: sum(xs) / len(xs)
    for r in rows:
        t = timing[r["method"]]
        r["dataset"] = name
        r["payload_bytes_per_token"] = sum(t["payload"]) / sum(t["tokens"])
        r["raw_kv_bytes_per_token"] = raw_per_token
        r["payload_ratio"] = r["payload_bytes_per_token"] / raw_per_token
        r["rebuild_s"] = mean(t["rebuild"])
        r["suffix_forward_s"] = mean(t["forward"])
        r["oracle_prefill_s"] = mean(t["oracle"])
        r["prompt_tokens"] = mean(t["prompt_tokens"])
        r["fallback_rate"] = mean(t["fell_back"])  # requests prefilled by the gate
        r["compute_ratio_vs_prefill"] = (sum(t["rebuild"]) + sum(t["forward"])) / sum(t["oracle"]) \
            if r["method"] != "oracle" else 1.0
        r["ttft_s"] = {str(bw): mean([p * 8 / (bw * 1e9) + rb + f for p, rb, f in
                                      zip(t["payload"], t["rebuild"], t["forward"])]) for bw in bandwidths}
    for bw in bandwidths:
        front = pareto(rows, bw)
        for r in rows:
            r.setdefault("on_pareto", {})[str(bw)] = r["method"] in front
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="held-out ToMi items (default 100)")
    p.add_argument("--n-hitom", type=int, default=50, help="Hi-ToM items (longer stories; default 50)")
    p.add_argument("--n-long", type=int, default=20, help=">=1k-token items (joined Hi-ToM; default 20)")
    p.add_argument("--producer", default="base")
    p.add_argument("--consumer", default="demo-ft")
    p.add_argument("--adapter", help="SCD adapter dir (default adapters/<consumer>)")
    p.add_argument("--reuse-adapter", help="SCD reuse-only adapter (default adapters/<consumer>-reuse)")
    p.add_argument("--scd-tail", default="",
                   help="also run SCD prefilling the last N prompt tokens (method scd_tailN; comma-separated N, "
                        "e.g. 16 = one store page, the most the serving engine prefills; default none)")
    p.add_argument("--scd-gate", default="",
                   help="also run SCD with the serving gate at these margins (method scd_gateM; comma-separated, "
                        "e.g. 0.2,0.4: prefill where the rebuilt first token's top-1 - top-2 probability < M)")
    p.add_argument("--droidspeak-width", type=int, default=6, help="recomputed contiguous layers")
    p.add_argument("--n-profile", type=int, default=24, help="dev prompts for DroidSpeak's window profiling")
    p.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS)), help="Gbps, comma-separated")
    p.add_argument("--json", required=True, help="output JSON-lines file")
    p.add_argument("--png", help="frontier plot (default: next to --json)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="greedy answer length cap (default 8: gold answers are one word)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bws = [int(x) for x in args.bandwidths.split(",")]
    producer, consumer = models.load(args.producer), models.load(args.consumer)
    raw = raw_kv_bytes_per_token(consumer.identity())
    methods = {"raw_kv": evaluate.raw_kv, "kivi4": baselines.kivi_method(4)}
    # DroidSpeak's offline profiling on dev prompts (never the test items)
    dev = [evaluate.PairItem(producer, consumer, it, data.prompt_ids(consumer.tokenizer, it))
           for it in data.load_tomi("dev")[: args.n_profile]]
    start, scores = baselines.profile_droidspeak(dev, args.droidspeak_width)
    log(f"DroidSpeak window: layers {start}..{start + args.droidspeak_width - 1} "
        f"(dev KL {scores[0][1]:.4f}; worst window {scores[-1][1]:.4f})")
    methods["droidspeak"] = baselines.droidspeak_method(start, args.droidspeak_width)
    tails = [int(x) for x in args.scd_tail.split(",") if x.strip()]
    gates = [float(x) for x in args.scd_gate.split(",") if x.strip()]
    if any(not 0.0 < m <= 1.0 for m in gates):
        p.error(f"--scd-gate margins must be in (0, 1], got {args.scd_gate}")
    for key, path in (("scd_reuse", adapter_dir(f"{args.consumer}-reuse", args.reuse_adapter)),
                      ("scd", adapter_dir(args.consumer, args.adapter))):
        try:
            adapter = check_models(load_adapter(path), producer, consumer)
        except FileNotFoundError as e:
            log(f"skipping {key}: {e}")
            continue
        methods[key] = scd_method(adapter)
        if key == "scd":
            methods.update({f"scd_tail{t}": scd_method(adapter, tail=t) for t in tails})
            methods.update({f"scd_gate{m:g}": scd_method(adapter, min_margin=m) for m in gates})
    sets = {"tomi": data.load_tomi("test")[: args.n], "hitom": data.load_hitom()[: args.n_hitom],
            "long1k": data.load_long_context(consumer.tokenizer)[: args.n_long]}
    config = {"producer": args.producer, "consumer": args.consumer, "bandwidths_gbps": bws,
              "droidspeak": {"start": start, "width": args.droidspeak_width}, "threads": torch.get_num_threads(),
              "max_new_tokens": args.max_new_tokens,
              "n": {k: len(v) for k, v in sets.items()}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with out.open("w") as f:
        for name, items in sets.items():
            if not items:
                continue
            rows = run_dataset(name, items, producer, consumer, methods, bws, raw, args.max_new_tokens)
            results[name] = rows
            for r in rows:
                f.write(json.dumps({**r, **provenance(config)}) + "\n")
                f.flush()
                log(f"{name:>6} {r['method']:>10} f1={r['f1']:.3f} kl={r['kl']:.4f} kl_ans={r['kl_answer']:.4f} same={r['same_answer']:.3f} "
                    f"payload={r['payload_ratio']:.3f}x compute={r['compute_ratio_vs_prefill']:.3f}x "
                    f"prefilled={r['fallback_rate']:.2f} "
                    f"ttft@200={r['ttft_s'].get('200', float('nan')) * 1e3:.1f}ms")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(results, bws, png)
    log(f"wrote {png}")


if __name__ == "__main__":
    main()
