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
import statistics
import sys
import time

import torch

from sgl_scd.codec import wire
from sgl_scd.demo import data
from sgl_scd.hf import runtime
from sgl_scd.hf.scd import encode_capture, folded, load_with_models
from sgl_scd.runinfo import write_jsonl


def token_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"--tokens needs prompt lengths >= 2, got {text!r}")
    return sorted(set(counts))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(adapter, producer, consumer, ids: list[int], repeats: int) -> dict:
    """Median seconds of each stage for one prompt (rebuild covers all tokens but the last)."""
    enc = adapter.encoder
    cap = runtime.capture_prefill(producer.model, ids[:-1], hidden=True, residual=True)
    fold = folded(adapter, consumer.model)
    fold.rebuild(wire.decode_pages(enc.codec, encode_capture(enc, cap), enc.digest, enc.page_size))  # warm up
    t = {k: [] for k in ("prefill_s", "encode_s", "decode_s", "fold_s", "suffix_s")}
    for _ in range(repeats):
        t["prefill_s"].append(runtime.continue_from_kv(consumer.model, consumer.tokenizer, ids,
                                                       max_new_tokens=0).forward_s)
        blobs, s = timed(encode_capture, enc, cap)
        t["encode_s"].append(s)
        with torch.inference_mode():
            codes, s = timed(wire.decode_pages, enc.codec, blobs, enc.digest, enc.page_size)
            t["decode_s"].append(s)
            (k, v), s = timed(fold.rebuild, codes)
            t["fold_s"].append(s)
        t["suffix_s"].append(runtime.continue_from_kv(consumer.model, consumer.tokenizer, ids, k, v,
                                                      max_new_tokens=0).forward_s)
    row = {k: statistics.median(v) for k, v in t.items()}
    row["payload_bytes"] = sum(map(len, blobs))
    row["compute_ratio"] = (row["decode_s"] + row["fold_s"] + row["suffix_s"]) / row["prefill_s"]
    return row


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
        ms = {k: row[k] * 1e3 for k in ("prefill_s", "encode_s", "decode_s", "fold_s", "suffix_s")}
        print(f"{n:>7} {ms['prefill_s']:>7.0f}ms {ms['encode_s']:>6.0f}ms {ms['decode_s']:>6.0f}ms "
              f"{ms['fold_s']:>6.0f}ms {ms['suffix_s']:>6.0f}ms {row['compute_ratio']:>6.3f}x", file=sys.stderr)
    config = {"producer": args.producer, "consumer": args.consumer, "adapter": adapter.name,
              "repeats": args.repeats, "threads": torch.get_num_threads()}
    write_jsonl(args.json, rows, config)


if __name__ == "__main__":
    main()
