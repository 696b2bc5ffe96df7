"""Serve a producer and a fine-tuned consumer that reuses the producer's prefill through SCD codes.

  python -m sgl_scd.launch                      # HTTP server on 127.0.0.1:30000, embedded store
  python -m sgl_scd.launch --demo 50            # scripted demo workload, then a report
  python -m sgl_scd.launch --store-url redis://127.0.0.1:6379/0 --port 30001

Settings: command-line flags > environment (SCD_STORE_URL, SCD_CACHE_DIR) > defaults.
The default store is embedded (SQLite under the user cache; no server needed). On a GPU
machine SGLang serves the models; this reference server runs them with transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_scd import data, models, quality, runtime
from sgl_scd.codec.manifest import adapter_dir, load_adapter
from sgl_scd.engine import ReuseEngine, store_identity
from sgl_scd.runinfo import provenance
from sgl_scd.store import open_store, resolve_url


def build_engine(args) -> ReuseEngine:
    producer, consumer = models.load(args.producer), models.load(args.consumer)
    adapter = load_adapter(adapter_dir(args.consumer, args.adapter), producer, consumer)
    store = open_store(args.store_url, store_identity(adapter, args.cache_salt), ttl_s=args.ttl)
    return ReuseEngine(producer, consumer, adapter, store, adapter_label=adapter.name, min_margin=args.min_margin)


def run_demo(engine: ReuseEngine, n: int, out: Path | None) -> dict:
    """Producer then consumer on n held-out ToMi prompts; compares with the consumer's own prefill."""
    items = data.load_tomi("test")[:n]
    tok = engine.consumer.tokenizer
    f1_scd, f1_oracle, same, reused, prompt, t_scd, t_oracle, fell_back = [], [], [], 0, 0, 0.0, 0.0, 0
    for it in tqdm(items, desc="demo: producer -> store -> consumer", file=sys.stderr):
        ids = data.prompt_ids(tok, it)
        engine.serve_producer(ids)
        t0 = time.perf_counter()
        res = engine.serve_consumer(ids)
        t_scd += time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = runtime.continue_from_kv(engine.consumer.model, tok, ids, max_new_tokens=engine.max_new_tokens)
        t_oracle += time.perf_counter() - t0
        f1_scd.append(quality.token_f1(res.text, it.answer))
        f1_oracle.append(quality.token_f1(ref.text, it.answer))
        same.append(quality.normalize_answer(res.text) == quality.normalize_answer(ref.text))
        reused += res.reused_tokens
        fell_back += res.miss_cause == "low_margin"
        prompt += res.prompt_tokens
    stats = engine.store.stats()
    m = engine.adapter.manifest["codec"]
    report = {
        "n": len(items), "store": engine.store.url,
        "f1_scd": sum(f1_scd) / len(items), "f1_oracle": sum(f1_oracle) / len(items),
        "same_answer": sum(same) / len(items), "reused_token_fraction": reused / prompt,
        "min_margin": engine.min_margin, "low_margin_fallback_rate": fell_back / len(items),
        "payload_ratio_vs_raw_bf16_kv": m["payload_ratio"], "patch_layers": m["patch_layers"],
        "consumer_request_s": t_scd / len(items), "consumer_prefill_request_s": t_oracle / len(items),
        "store_stats": stats["adapters"],
    }
    print(f"\nSCD demo on {len(items)} held-out ToMi prompts ({engine.producer.spec} -> {engine.consumer.spec}, "
          f"store {engine.store.url})")
    print(f"  F1 with reused prefill  {report['f1_scd']:.3f}   (consumer's own prefill: {report['f1_oracle']:.3f})")
    print(f"  same answer as prefill  {report['same_answer']:.3f}")
    print(f"  prompt tokens reused    {report['reused_token_fraction']:.3f} (full pages, last token prefilled)")
    print(f"  prefilled (near-tie)    {report['low_margin_fallback_rate']:.3f} of requests (--min-margin {engine.min_margin})")
    print(f"  payload vs raw bf16 KV  {m['payload_ratio']:.3f}x   patch layers {m['patch_layers']}")
    print(f"  consumer request        {report['consumer_request_s'] * 1e3:.0f} ms with codes vs "
          f"{report['consumer_prefill_request_s'] * 1e3:.0f} ms with prefill (2-core CPU, short prompts)")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, **provenance({"demo_n": n})}, indent=2))
        print(f"  report: {out}")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sgl_scd.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producer", default="base", help="producer model spec (default base)")
    p.add_argument("--consumer", default="demo-ft", help="consumer model spec (default demo-ft)")
    p.add_argument("--adapter", help="SCD adapter dir (default adapters/<consumer>)")
    p.add_argument("--store-url", default=None,
                   help="embedded:// (default), embedded:///path, redis://host:port/db, rediss://, "
                        "redis+cluster://host:port (env SCD_STORE_URL)")
    p.add_argument("--cache-salt", default="", help="tenant salt: separates store namespaces")
    p.add_argument("--ttl", type=float, default=86400.0, help="seconds a published page lives (default 1 day)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="prefill instead of reusing when the rebuilt cache's first answer token is a near-tie: "
                        "top-1 minus top-2 probability below this (0 = always reuse; default %(default)s, "
                        "see README: quality vs compute)")
    p.add_argument("--demo", type=int, metavar="N", help="run the demo workload on N prompts and exit")
    p.add_argument("--report", default="out/demo_report.json", help="demo report path")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    try:
        runtime.check_min_margin(args.min_margin)
    except ValueError as e:
        p.error(f"--min-margin: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.store_url = resolve_url(args.store_url)
    try:
        engine = build_engine(args)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.demo:
        run_demo(engine, args.demo, Path(args.report) if args.report else None)
        engine.store.close()
        return
    server = make_server_and_announce(engine, args)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.store.close()


def make_server_and_announce(engine, args):
    from sgl_scd.server import make_server

    server = make_server(engine, args.host, args.port)
    print(f"sgl_scd serving {engine.producer.spec} (producer) and {engine.consumer.spec} (consumer) on "
          f"http://{args.host}:{server.server_address[1]}  store={engine.store.url}", file=sys.stderr, flush=True)
    return server


if __name__ == "__main__":
    main()
