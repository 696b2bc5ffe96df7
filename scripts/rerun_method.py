#!/usr/bin/env python
"""Re-measure one baseline of bench_pareto on the same items (e.g. after a fix) without
re-running the rest: prints its JSON line (same fields as bench_pareto, minus TTFT/Pareto)."""

import argparse
import json

from sgl_scd.demo import data
from sgl_scd.evaluation import baselines, evaluate
from sgl_scd.hf import models
from sgl_scd.runinfo import provenance


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", choices=["kivi4"], default="kivi4")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--consumer", default="demo-ft")
    args = p.parse_args()
    prod, cons = models.load("base"), models.load(args.consumer)
    rows = evaluate.evaluate(prod, cons, data.load_tomi("test")[: args.n], {"kivi4": baselines.kivi_method(4)},
                             max_new_tokens=8, desc=args.method)
    for r in rows:
        print(json.dumps({**r, "dataset": "tomi", **provenance(vars(args))}))


if __name__ == "__main__":
    main()
