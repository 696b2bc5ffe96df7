#!/usr/bin/env python
"""Quality of KV reuse from the base (producer) into a fine-tune (consumer), against the oracle.

Prints one JSON line per method (--json) or a table: F1/EM vs the gold answer, next-token
KL and top-1 agreement vs the consumer's own prefill, and the rate of giving the oracle's answer.

  python scripts/eval_quality.py --n 500 --json                 # both demo pairs
  python scripts/eval_quality.py --consumer demo-lora --n 100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.hf import models
from sgl_scd.runinfo import provenance


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="held-out items per pair (default 100)")
    p.add_argument("--producer", default="base", help="producer model spec (default base)")
    p.add_argument("--consumer", action="append",
                   help="consumer model spec; repeatable (default: demo-ft and demo-lora)")
    p.add_argument("--dataset", choices=["tomi", "hitom"], default="tomi",
                   help="tomi: held-out ToMi test split; hitom: longer Hi-ToM stories")
    p.add_argument("--methods", default="oracle,producer,raw_kv",
                   help="comma-separated subset of " + ",".join(evaluate.BASELINES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in evaluate.BASELINES]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(evaluate.BASELINES)}")
    items = (data.load_tomi("test") if args.dataset == "tomi" else data.load_hitom())[: args.n]
    prod = models.load(args.producer)
    for consumer in args.consumer or ["demo-ft", "demo-lora"]:
        cons = models.load(consumer)
        methods = {m: evaluate.BASELINES[m] for m in args.methods.split(",")}
        rows = evaluate.evaluate(prod, cons, items, methods, desc=f"{args.producer}->{consumer}")
        config = {"producer": args.producer, "consumer": consumer, "dataset": args.dataset, "n": len(items)}
        for row in rows:
            if args.json:
                print(json.dumps({**row, "producer": args.producer, "consumer": consumer,
                                  "dataset": args.dataset, **provenance(config)}))
            else:
                print(f"{consumer:>10} {row['method']:>10}  n={row['n']:4d} f1={row['f1']:.3f}"
                      f"±{row['f1_se']:.3f} em={row['em']:.3f} kl={row['kl']:.3f} "
                      f"top1={row['top1']:.3f} same={row['same_answer']:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
