#!/usr/bin/env python
"""One published code set, many consumers: each consumer against its own oracle (its prefill).

For every adapter calibrated against --encoder (or those named), on the same held-out items:
the consumer's own prefill (oracle), raw producer KV, SCD through the shared encoder, and, where
an adapter of the same consumer calibrated with its own encoder exists (adapters/<name>-own, from
`python -m sgl_scd.calibrate --consumer SPEC --name <name>-own`), SCD through that one too: what
sharing the encoder costs. One JSON line per (set, consumer, method) with config, git SHA, machine.

  python scripts/bench_consumers.py --n 200 --json out/consumers.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from sgl_scd.codec.manifest import load_adapter, load_encoder
from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.evaluation.methods import scd_method
from sgl_scd.hf import models
from sgl_scd.hf.scd import check_models
from sgl_scd.runinfo import write_jsonl
from sgl_scd.settings import ADAPTERS_DIR, DEFAULT_ENCODER


def items_of(name: str, n: int, tokenizer) -> list[data.QAItem]:
    """Held-out items of a set: ToMi test, Hi-ToM eval, joined >= 1k-token stories (eval split)."""
    if name == "tomi":
        return data.load_tomi("test")[:n]
    if name == "hitom":
        return data.load_hitom("eval")[:n]
    return data.load_long_context(tokenizer, split="eval")[:n]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default=str(DEFAULT_ENCODER), help="the published encoder (default %(default)s)")
    p.add_argument("--consumer", action="append", default=[], metavar="ADAPTER",
                   help="adapter names under adapters/ (repeatable; default: all calibrated against --encoder)")
    p.add_argument("--sets", default="tomi", help="comma list of tomi, hitom, long (default tomi)")
    p.add_argument("--n", type=int, default=200, help="items per set (default 200)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", required=True, help="output JSON-lines file")
    args = p.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    bad = [s for s in sets if s not in ("tomi", "hitom", "long")]
    if bad or args.n < 1:
        p.error(f"--sets takes tomi, hitom, long and --n >= 1; got {args.sets!r}, {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = load_encoder(Path(args.encoder))
    paths = [ADAPTERS_DIR / c for c in args.consumer] or encoder.adapters()
    producer = models.load("base")
    rows = []
    for path in paths:
        shared = load_adapter(path, encoder)
        consumer = models.load(shared.manifest.consumer.spec)
        check_models(shared, producer, consumer)
        used = {"scd_shared": shared}
        own_dir = ADAPTERS_DIR / f"{shared.name}-own"
        if (own_dir / "manifest.json").exists():
            used["scd_own_encoder"] = check_models(load_adapter(own_dir), producer, consumer)
        methods = {"raw_kv": evaluate.raw_kv, **{k: scd_method(a) for k, a in used.items()}}
        for s in sets:
            items = items_of(s, args.n, consumer.tokenizer)
            got = evaluate.evaluate(producer, consumer, items, methods, desc=f"{shared.name}/{s}")
            oracle_f1 = next(r["f1"] for r in got if r["method"] == "oracle")
            for r in got:
                a = used.get(r["method"])
                r.update(set=s, consumer=shared.name, encoder=a.encoder.path.name if a else None,
                         patch_layers=a.patch_layers if a else None,
                         f1_over_oracle=r["f1"] / oracle_f1 if oracle_f1 else math.nan,
                         same_answer_se=math.sqrt(r["same_answer"] * (1 - r["same_answer"]) / max(1, r["n"])),
                         payload_ratio=a.encoder.manifest.payload_ratio if a else None)
                rows.append(r)
                print(f"{s:<6} {shared.name:<11} {r['method']:<16} n={r['n']:<4} F1 {r['f1']:.3f} "
                      f"({r['f1_over_oracle']:.2f}x) KL {r['kl']:.3f} same {r['same_answer']:.3f} "
                      f"+-{r['same_answer_se']:.3f}", file=sys.stderr)
    write_jsonl(args.json, rows, {"encoder": encoder.revision[:12], "sets": sets, "n": args.n,
                                  "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
