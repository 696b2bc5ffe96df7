#!/usr/bin/env python
"""The producer's request latency with encode + publish in the request vs in the background worker.

Same prompts, same process, alternating rounds (inline, background, inline, background) so drift
on a shared machine hits both; each mode publishes into its own fresh embedded store. A request is
prefill + (publish) + decode of --max-tokens tokens; background jobs run while later requests do.

  python scripts/bench_publish.py --encoder adapters/quick-encoder --n 24 --json out/bench_publish.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sgl_scd.codec.manifest import load_encoder
from sgl_scd.demo import data
from sgl_scd.hf import models
from sgl_scd.reuse import store_identity
from sgl_scd.runinfo import write_jsonl
from sgl_scd.serving.engine import PRODUCER, Generation, ReuseEngine, Sampling
from sgl_scd.settings import DEFAULT_ENCODER
from sgl_scd.store import open_store


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default=str(DEFAULT_ENCODER), help="default %(default)s")
    p.add_argument("--n", type=int, default=24, help="prompts per round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each mode (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="answer tokens (default %(default)s)")
    p.add_argument("--hitom", action="store_true", help="Hi-ToM prompts (~300-600 tokens) instead of ToMi")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the JSON line here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder = load_encoder(Path(args.encoder))
    producer = models.load(encoder.manifest.producer.spec)
    items = (data.load_hitom("eval") if args.hitom else data.load_tomi("test"))[: args.n]
    prompts = [data.prompt_ids(producer.tokenizer, it) for it in items]
    tmp = Path(tempfile.mkdtemp())
    engines = {mode: ReuseEngine(producer, encoder, open_store(f"embedded://{tmp}/{mode}.sqlite3",
                                                               store_identity(encoder), stats_flush_s=0), {},
                                 background_publish=mode == "background") for mode in ("inline", "background")}
    lat = {mode: [] for mode in engines}
    publish_s = []
    for _ in range(args.rounds):
        for mode, eng in engines.items():
            for ids in prompts:
                gen = eng.run(Generation(PRODUCER, ids, Sampling(args.max_tokens)))
                lat[mode].append(gen.timings["total_s"])
                if mode == "inline":
                    publish_s.append(gen.timings["publish_s"])
            if eng.worker:
                t0 = time.perf_counter()
                eng.worker.drain()
                print(f"background: queue drained {time.perf_counter() - t0:.2f} s after the round's last request")
    mean = {m: statistics.mean(v) for m, v in lat.items()}
    row = {"n": len(prompts) * args.rounds, "mean_tokens": statistics.mean(len(x) for x in prompts),
           "inline_request_s": mean["inline"], "background_request_s": mean["background"],
           "ratio_background_vs_inline": mean["background"] / mean["inline"],
           "inline_publish_s": statistics.mean(publish_s),
           "median_inline_s": statistics.median(lat["inline"]), "median_background_s": statistics.median(lat["background"])}
    for k, v in row.items():
        print(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
    if args.json:
        write_jsonl(args.json, [row], {**vars(args), "json": str(args.json), "encoder_revision": encoder.revision})
    for eng in engines.values():
        eng.close()
        eng.store.close()


if __name__ == "__main__":
    main()
