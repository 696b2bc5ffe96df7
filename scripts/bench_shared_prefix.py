#!/usr/bin/env python
"""Shared-prefix quality across adapters: what serving reuses, against every baseline, in one run.

Workload (as serving sees it): stories with several questions. The base answers each story's
first question and so publishes the story's full pages; every consumer answers the story's other
questions reusing exactly those pages (the common prefix of the two prompts, floored to whole
pages) and prefilling the rest (question and chat tail) with its own weights. Per consumer and
method, against the consumer's own prefill of the same prompt (the oracle): F1 / oracle F1, same
answer (+- standard error), KL and top-1 of the first answer token (and KL over the later answer
tokens, kl_answer), reused-token fraction, requests the gate prefilled, payload / raw bf16 KV of
the reused tokens, (rebuild + suffix) / prefill, and same answer on the items whose first answer
token the adapter itself is sure of (same_answer_sure, over sure_fraction of the items).

Methods: raw_kv (the base's KV), raw_kv_rerot (its keys re-rotated to the consumer's RoPE base),
kivi4_rerot (4-bit KIVI-style, re-rotated), droidspeak_wW (reuse the base's KV, recompute a
window of W consumer layers from the base's residual stream; the window start profiled on ToMi
dev items), scd_reuse (SCD without patch layers: adapters/<adapter>-reuse, its own encoder, when it
exists), scd, scd_recomputeP (SCD rebuilding all but the last P pages, which the consumer
prefills itself), scd_gate (the adapter's manifest min_margin: near-tie answers prefilled; read off
the same item's scd and oracle outputs as the serving gate decides, so scd runs once).
Noise-floor references (the consumer's own cache of the reused tokens, so not reusable across
models; evaluation/baselines.py): own_bf16kv (rounded to bf16, as a GPU pool holds it) and
own_kivi4 (4-bit KIVI-style, about SCD's payload).

Sets: tomi (ToMi stories with several questions), hitom (Hi-ToM: 5 questions per story), long
(>= 1k-token prompts: distinct Hi-ToM stories joined, every question of the last story).
Splits: --split dev (ToMi dev; Hi-ToM and long: the calib split's stories calibration held out
for its dev) is where choices are made; --split test (ToMi test; Hi-ToM eval) is measured once
per reported change. --choose-gate (dev only) picks each adapter's gate threshold: the smallest
min_margin whose gated same-answer rate on dev reaches --gate-target, written into the adapter's
manifest with --write-gate and used by default when serving.

  python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split dev --choose-gate --write-gate
  python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split test --json out/shared_prefix.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

import torch

from sgl_scd.codec import manifest as mf
from sgl_scd.demo import data
from sgl_scd.evaluation import baselines, evaluate
from sgl_scd.evaluation.methods import scd_method
from sgl_scd.hf import models, runtime
from sgl_scd.hf.scd import check_models
from sgl_scd.reuse import top2_margin
from sgl_scd.runinfo import write_jsonl
from sgl_scd.settings import DEFAULT_ENCODER

SETS = ("tomi", "hitom", "long")
GATE_GRID = [round(0.05 * i, 2) for i in range(21)]
# The adapter is sure of its own first answer token when top-1 leads top-2 by at least this much
# probability: flipping such a lead takes total variation >= 0.25, so KL >= 0.125 (Pinsker), above
# the targets' KL (<= 0.1).
SURE_MARGIN = 0.5


def workload(name: str, split: str, n_stories: int, tokenizer) -> list[list[data.QAItem]]:
    """Stories (each a list of questions, the producer's first) of a set's dev or test split."""
    if name == "long":  # dev: the joined calib prompts calibration holds out (builtin_long_prompts)
        return (data.long_stories(tokenizer, split="calib")[0::2] if split == "dev"
                else data.long_stories(tokenizer, split="eval"))[:n_stories]
    if name == "tomi":
        items = data.load_tomi("dev" if split == "dev" else "test")
    else:
        items = data.load_hitom_dev() if split == "dev" else data.load_hitom("eval")
    return data.stories(items, n_stories)


def shared_tokens(tokenizer, producer_item: data.QAItem, page_size: int):
    """reuse_tokens(item, ids) for evaluate(): the common prefix of the producer's prompt and the
    consumer's, floored to whole pages (what the producer published and the store holds)."""
    base = data.prompt_ids(tokenizer, producer_item)

    def reuse(item, ids) -> int:
        n = next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), min(len(base), len(ids)))
        return min(n, len(ids) - 1) // page_size * page_size
    return reuse


def pairs_of(stories, producer, consumer, page_size: int) -> list[tuple[data.QAItem, object]]:
    """(consumer item, its reuse_tokens function) of every story's questions after the first."""
    out = []
    for qs in stories:
        fn = shared_tokens(consumer.tokenizer, qs[0], page_size)
        out += [(it, fn) for it in qs[1:] if fn(it, data.prompt_ids(consumer.tokenizer, it)) > 0]
    return out


def gate_replay(min_margin: float) -> tuple[dict, evaluate.Method]:
    """scd_gate read off the same item's scd and oracle outputs, as the serving gate decides
    (runtime.prefill_on_kv): the rebuilt cache is kept when its first answer token's top-1 leads
    top-2 by >= min_margin, else the adapter's own prefill is served (the oracle's output; the
    cost counts the suffix forward and that prefill). The same answers and logits as
    scd_method(min_margin=), without encoding and rebuilding each item twice. Returns (seen,
    method): wrap the oracle and scd methods with seen-recording before the replay runs."""
    seen: dict[str, tuple] = {}

    def run(p) -> runtime.Continuation:
        (p_oracle, oracle), (p_scd, scd) = seen["oracle"], seen["scd"]
        if p_oracle is not p or p_scd is not p:
            raise RuntimeError("gate_replay runs after the oracle and scd of the same item")
        if top2_margin(scd.first_logits) >= min_margin:
            return scd
        return dataclasses.replace(oracle, forward_s=scd.forward_s + oracle.forward_s, fell_back=True,
                                   timings=dict(scd.timings))
    return seen, run


def recorded(seen: dict, name: str, method: evaluate.Method) -> evaluate.Method:
    """method, keeping its last (item, output) in seen[name] for gate_replay."""
    def run(p):
        seen[name] = (p, out := method(p))
        return out
    return run


def run(producer, consumer, pairs, methods, desc: str) -> tuple[list[dict], dict]:
    """evaluate() over the pairs; per-method timing ratios, reuse fraction and payload, and the
    SCD first-token margins with same-answer flags (what the gate is chosen from)."""
    per = {name: {"ratio": [], "reused": [], "payload": [], "prefilled": [], "sure_same": []}
           for name in ["oracle", *methods]}
    margins = []
    by_item = {it.uid: fn for it, fn in pairs}

    def on_item(p, outs):
        prefill = outs["oracle"].forward_s
        raw_per_token = mf.raw_kv_bytes_per_token(consumer.identity())
        for name, out in outs.items():
            t = out.timings
            per[name]["ratio"].append((t.get("rebuild_s", 0.0) + out.forward_s) / prefill)
            per[name]["reused"].append(t.get("tokens", 0) / len(p.ids))
            per[name]["prefilled"].append(float(out.fell_back))  # the gate dropped the reused pages
            if t.get("tokens"):
                per[name]["payload"].append(t.get("payload_bytes", 0) / (t["tokens"] * raw_per_token))
            if top2_margin(outs["oracle"].first_logits) >= SURE_MARGIN:
                per[name]["sure_same"].append(float(data_same(out.text, outs["oracle"].text)))
        if "scd" in outs:
            same = data_same(outs["scd"].text, outs["oracle"].text)
            margins.append((top2_margin(outs["scd"].first_logits), same))

    rows = evaluate.evaluate(producer, consumer, [it for it, _ in pairs], methods, desc=desc, on_item=on_item,
                             reuse_tokens=lambda item, ids: by_item[item.uid](item, ids))
    for r in rows:
        d = per[r["method"]]
        r.update(compute_ratio=statistics.mean(d["ratio"]), reused_fraction=statistics.mean(d["reused"]),
                 prefilled=statistics.mean(d["prefilled"]),
                 payload_ratio=statistics.mean(d["payload"]) if d["payload"] else 0.0,
                 sure_fraction=len(d["sure_same"]) / max(1, r["n"]),  # items the oracle is sure of
                 same_answer_sure=statistics.mean(d["sure_same"]) if d["sure_same"] else math.nan,
                 same_answer_se=math.sqrt(r["same_answer"] * (1 - r["same_answer"]) / max(1, r["n"])))
    return rows, {"margins": margins}


def data_same(a: str, b: str) -> bool:
    from sgl_scd.evaluation.quality import normalize_answer

    return normalize_answer(a) == normalize_answer(b)


def choose_gate(margins: list[tuple[float, bool]], target: float) -> dict:
    """The smallest min_margin whose gated same-answer rate (prefilled items count as the
    oracle's own answer) reaches target, and the curve it was read from."""
    curve = []
    for m in GATE_GRID:
        pre = [mg < m for mg, _ in margins]
        same = statistics.mean([1.0 if p else float(s) for p, (_, s) in zip(pre, margins)])
        curve.append({"min_margin": m, "same_answer": same, "prefilled": statistics.mean(map(float, pre))})
    ok = [c for c in curve if c["same_answer"] >= target]
    chosen = ok[0] if ok else max(curve, key=lambda c: (c["same_answer"], -c["prefilled"]))
    return {**chosen, "target": target, "reached": bool(ok), "n": len(margins), "curve": curve}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default=str(DEFAULT_ENCODER), help="the published encoder (default %(default)s)")
    p.add_argument("--consumer", action="append", default=[], metavar="DIR",
                   help="adapter dirs (repeatable; default: every adapter calibrated against --encoder)")
    p.add_argument("--sets", default="tomi,hitom", help=f"comma list of {', '.join(SETS)} (default tomi,hitom)")
    p.add_argument("--split", choices=("dev", "test"), required=True,
                   help="dev: where choices are made; test: measured once per reported change")
    p.add_argument("--stories", type=int, default=40, help="stories per set (default 40)")
    p.add_argument("--droidspeak-widths", default="2,4,8", help="recompute windows (default 2,4,8; '' for none)")
    p.add_argument("--droidspeak-profile", type=int, default=6,
                   help="ToMi dev items that choose each window's start (default 6)")
    p.add_argument("--recompute-pages", default="",
                   help="comma list of P: scd_recomputeP rows, the consumer prefills the last P shared pages (default none)")
    p.add_argument("--methods", help="comma list: only these methods, named as in the output (e.g. scd,scd_recompute1; default all)")
    p.add_argument("--choose-gate", action="store_true", help="dev only: pick each adapter's gate threshold")
    p.add_argument("--gate-target", type=float, default=0.98, help="gated same-answer rate to reach (default 0.98)")
    p.add_argument("--write-gate", action="store_true", help="write the chosen threshold into the adapter's manifest")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", help="output JSON-lines file")
    args = p.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if any(s not in SETS for s in sets) or args.stories < 1:
        p.error(f"--sets takes {SETS} and --stories >= 1; got {args.sets!r}, {args.stories}")
    if (args.choose_gate or args.write_gate) and args.split != "dev":
        p.error("--choose-gate / --write-gate tune on the dev split only: add --split dev")
    widths = [int(w) for w in args.droidspeak_widths.split(",") if w.strip()]
    recompute = [int(x) for x in args.recompute_pages.split(",") if x.strip()]
    if any(r < 1 for r in recompute):
        p.error(f"--recompute-pages takes page counts >= 1, got {args.recompute_pages!r}")
    only = {m for m in (args.methods or "").split(",") if m}
    known = {"raw_kv", "raw_kv_rerot", "kivi4_rerot", "own_bf16kv", "own_kivi4", "scd_reuse", "scd", "scd_gate",
             *(f"droidspeak_w{w}" for w in widths), *(f"scd_recompute{r}" for r in recompute)}
    if only - known:
        p.error(f"--methods: unknown {sorted(only - known)}; known (with these flags): {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = mf.load_encoder(Path(args.encoder))
    paths = [Path(c) for c in args.consumer] or encoder.adapters()
    producer = models.load("base")
    rows, gates = [], {}
    for path in paths:
        adapter = mf.load_adapter(path, encoder)
        consumer = models.load(adapter.manifest.consumer.spec)
        check_models(adapter, producer, consumer)
        ps = encoder.page_size
        work = {s: pairs_of(workload(s, args.split, args.stories, consumer.tokenizer), producer, consumer, ps)
                for s in sets}
        methods = {"scd": scd_method(adapter)}
        if not args.choose_gate:
            methods = {"raw_kv": evaluate.raw_kv, "raw_kv_rerot": baselines.rerotated_kv,
                       "kivi4_rerot": baselines.kivi_method(4, rerotate=True),
                       "own_bf16kv": baselines.own_cache_method("bf16"), "own_kivi4": baselines.own_cache_method("kivi4")}
            # each window's start is profiled on ToMi dev items (short, so cheap), never on test
            dev = pairs_of(workload("tomi", "dev", args.droidspeak_profile, consumer.tokenizer),
                           producer, consumer, ps)
            dev_pairs = [evaluate.PairItem(producer, consumer, it, ids, reuse_tokens=fn(it, ids))
                         for it, fn in dev[: args.droidspeak_profile]
                         for ids in [data.prompt_ids(consumer.tokenizer, it)]]
            for w in [w for w in widths if not only or f"droidspeak_w{w}" in only]:
                start, _ = baselines.profile_droidspeak(dev_pairs, w)
                methods[f"droidspeak_w{w}"] = baselines.droidspeak_method(start, w)
            reuse_only = path.parent / f"{adapter.name}-reuse"
            if (reuse_only / mf.ADAPTER_FILE).exists():
                methods["scd_reuse"] = scd_method(check_models(mf.load_adapter(reuse_only), producer, consumer))
            methods["scd"] = scd_method(adapter)
            methods.update({f"scd_recompute{r}": scd_method(adapter, recompute_pages=r) for r in recompute})
            if only:
                methods = {k: m for k, m in methods.items() if k in only}
            if adapter.manifest.min_margin > 0 and (not only or "scd_gate" in only):
                # evaluate() runs the methods in this order: the oracle first, scd, then its gate
                seen, replay = gate_replay(adapter.manifest.min_margin)
                scd = recorded(seen, "scd", methods.pop("scd", None) or scd_method(adapter))
                methods = {"oracle": recorded(seen, "oracle", evaluate.oracle),
                           **{k: m for k, m in methods.items() if k != "scd_gate"}, "scd": scd, "scd_gate": replay}
        margins = []
        for s in sets:
            got, extra = run(producer, consumer, work[s], methods, f"{adapter.name}/{s}/{args.split}")
            margins += extra["margins"]
            oracle_f1 = next(r["f1"] for r in got if r["method"] == "oracle")
            for r in got:
                r.update(set=s, split=args.split, consumer=adapter.name, encoder=encoder.path.name,
                         f1_over_oracle=r["f1"] / oracle_f1 if oracle_f1 else math.nan,
                         min_margin=adapter.manifest.min_margin if r["method"] == "scd_gate" else None)
                rows.append(r)
                print(f"{s:<6} {args.split:<4} {adapter.name:<12} {r['method']:<14} n={r['n']:<4} "
                      f"F1 {r['f1_over_oracle']:.2f}x KL {r['kl']:.3f} top1 {r['top1']:.2f} same "
                      f"{r['same_answer']:.3f}+-{r['same_answer_se']:.3f} reused {r['reused_fraction']:.2f} "
                      f"payload {r['payload_ratio']:.3f} cost {r['compute_ratio']:.3f} "
                      f"sure {r['sure_fraction']:.2f}: same {r['same_answer_sure']:.3f}", file=sys.stderr)
        if args.choose_gate:
            gate = choose_gate(margins, args.gate_target)
            gates[adapter.name] = gate
            print(f"gate {adapter.name}: min_margin {gate['min_margin']} -> same {gate['same_answer']:.3f}, "
                  f"prefilled {gate['prefilled']:.2f} (dev n={gate['n']}, target {args.gate_target}"
                  f"{'' if gate['reached'] else ', not reached'})", file=sys.stderr)
            rows.append({"method": "gate_choice", "consumer": adapter.name, "split": "dev", "sets": sets,
                         **{k: v for k, v in gate.items()}})
            if args.write_gate:
                m = dataclasses.replace(adapter.manifest, min_margin=gate["min_margin"],
                                        heldout={**adapter.manifest.heldout, "gate": {
                                            k: gate[k] for k in ("same_answer", "prefilled", "target", "n")}
                                            | {"split": f"{'+'.join(sets)} dev, shared prefix"}})
                mf.save_adapter_manifest(path, m)
    if args.json:
        write_jsonl(args.json, rows, {"encoder": encoder.revision[:12], "sets": sets, "split": args.split,
                                      "stories": args.stories, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
