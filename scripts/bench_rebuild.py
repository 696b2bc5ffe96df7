#!/usr/bin/env python
"""Where a rebuild's time goes, beside the consumer's own prefill, at several prompt lengths.

Per length L (the first L tokens of a joined Hi-ToM prompt), every stage timed in the same
loop, interleaved with the prefill, median of --repeats:
  prefill_s  the consumer's prefill of all L tokens (what a hit saves)
  encode_s   producer side: codes and page blobs from its capture (off the consumer's path)
  decode_s   consumer side: page checks and bit unpacking -> integer codes
  fold_s     consumer side: the folded decoder, codes -> K/V of every layer
  suffix_s   consumer side: the last prompt token run on the rebuilt cache
  compute_ratio = (decode_s + fold_s + suffix_s) / prefill_s
One JSON line per length to --json (config, git SHA, machine), and a table on stderr.

  python scripts/bench_rebuild.py --tokens 256,512,1024,2048 --json out/bench_rebuild.jsonl
"""

from __future__ import annotations

import argparse
import sys

import torch

from sgl_scd.demo import data
from sgl_scd.evaluation.timing import STAGES, measure, token_counts
from sgl_scd.hf.scd import load_with_models
from sgl_scd.runinfo import write_jsonl


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=token_counts, default=token_counts("256,512,1024,2048"),
                   help="prompt lengths, comma-separated (default 256,512,1024,2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per length; the median is kept (default 5)")
    p.add_argument("--producer", default="base")
    p.add_argument("--consumer", default="demo-ft")
    p.add_argument("--adapter", help="SCD adapter dir (default adapters/<consumer>)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", required=True, help="output JSON-lines file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    producer, consumer, adapter = load_with_models(args.consumer, args.adapter, args.producer)
    longest = max(args.tokens)
    source = next((ids for it in data.load_long_context(consumer.tokenizer, min_tokens=longest)
                   if len(ids := data.prompt_ids(consumer.tokenizer, it)) >= longest), None)
    if source is None:
        p.error(f"no joined Hi-ToM prompt reaches {longest} tokens; ask for shorter --tokens")
    rows = []
    print(f"{'tokens':>7} {'prefill':>9} {'encode':>8} {'decode':>8} {'fold':>8} {'suffix':>8} {'ratio':>7}",
          file=sys.stderr)
    for n in args.tokens:
        row = {"tokens": n, **measure(adapter, producer, consumer, source[:n], args.repeats)}
        rows.append(row)
        ms = {k: row[k] * 1e3 for k in STAGES}
        print(f"{n:>7} {ms['prefill_s']:>7.0f}ms {ms['encode_s']:>6.0f}ms {ms['decode_s']:>6.0f}ms "
              f"{ms['fold_s']:>6.0f}ms {ms['suffix_s']:>6.0f}ms {row['compute_ratio']:>6.3f}x", file=sys.stderr)
    config = {"producer": args.producer, "consumer": args.consumer, "adapter": adapter.name,
              "repeats": args.repeats, "threads": torch.get_num_threads()}
    write_jsonl(args.json, rows, config)


if __name__ == "__main__":
    main()
