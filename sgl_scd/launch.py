"""Serve a producer and the consumers that reuse its prefill through one published SCD code set.

  python -m sgl_scd.launch                      # HTTP server on 127.0.0.1:30000, embedded store
  python -m sgl_scd.launch --demo 50            # scripted demo workload, then a report
  python -m sgl_scd.launch --consumer demo-ft --consumer demo-lora   # only these adapters
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

from sgl_scd.codec.manifest import load_adapter, load_encoder
from sgl_scd.demo import data
from sgl_scd.evaluation import quality
from sgl_scd.hf import models, runtime
from sgl_scd.reuse import check_min_margin, store_identity
from sgl_scd.runinfo import provenance
from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.settings import ADAPTERS_DIR, DEFAULT_ENCODER
from sgl_scd.store import open_store, resolve_url


def build_engine(args) -> ReuseEngine:
    """The producer, the encoder's store and every adapter asked for (default: all calibrated against it)."""
    encoder = load_encoder(Path(args.encoder))
    paths = [ADAPTERS_DIR / c if not Path(c).is_dir() else Path(c) for c in args.consumer] or encoder.adapters()
    if not paths:
        raise FileNotFoundError(f"no adapter is calibrated against {encoder.path}; run `python -m sgl_scd.calibrate "
                                f"--consumer SPEC --encoder {encoder.path}`")
    producer = models.load(args.producer)
    consumers = {}
    for path in paths:
        adapter = load_adapter(path, encoder)
        consumers[adapter.name] = (models.load(adapter.manifest.consumer.spec), adapter)
    store = open_store(args.store_url, store_identity(encoder, args.cache_salt), ttl_s=args.ttl)
    return ReuseEngine(producer, encoder, store, consumers, min_margin=args.min_margin)


def run_demo(engine: ReuseEngine, n: int, out: Path | None) -> dict:
    """Producer then every consumer on n held-out ToMi prompts; each compared with its own prefill."""
    items = data.load_tomi("test")[:n]
    tok = engine.producer.tokenizer
    rows = {name: {"f1": [], "f1_oracle": [], "same": [], "reused": 0, "prompt": 0, "t": 0.0, "t_oracle": 0.0,
                   "fell_back": 0} for name in engine.consumers}
    for it in tqdm(items, desc="demo: producer -> store -> consumers", file=sys.stderr):
        ids = data.prompt_ids(tok, it)
        engine.serve_producer(ids)
        for name, c in engine.consumers.items():
            r = rows[name]
            t0 = time.perf_counter()
            res = engine.serve_consumer(name, ids)
            r["t"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = runtime.continue_from_kv(c.model.model, tok, ids, max_new_tokens=engine.max_new_tokens)
            r["t_oracle"] += time.perf_counter() - t0
            r["f1"].append(quality.token_f1(res.text, it.answer))
            r["f1_oracle"].append(quality.token_f1(ref.text, it.answer))
            r["same"].append(quality.normalize_answer(res.text) == quality.normalize_answer(ref.text))
            r["reused"] += res.reused_tokens
            r["fell_back"] += res.miss_cause == "low_margin"
            r["prompt"] += res.prompt_tokens
    em = engine.encoder.manifest
    report = {"n": len(items), "store": engine.store.url, "encoder": em.name, "patch_layers": em.h_layers,
              "payload_ratio_vs_raw_bf16_kv": em.payload_ratio, "consumers": {}}
    print(f"\nSCD demo on {len(items)} held-out ToMi prompts: {engine.producer.spec} publishes one code set "
          f"({em.name}, {em.payload_ratio:.3f}x raw bf16 KV, patch layers {em.h_layers}), store {engine.store.url}")
    print(f"  {'consumer':<12} {'F1':>6} {'F1 own':>7} {'same':>6} {'reused':>7} {'gated':>6} {'ms codes':>9} "
          f"{'ms prefill':>11}")
    for name, r in rows.items():
        k = len(items)
        report["consumers"][name] = row = {
            "f1_scd": sum(r["f1"]) / k, "f1_oracle": sum(r["f1_oracle"]) / k, "same_answer": sum(r["same"]) / k,
            "reused_token_fraction": r["reused"] / r["prompt"], "min_margin": engine.consumers[name].min_margin,
            "low_margin_fallback_rate": r["fell_back"] / k, "consumer_request_s": r["t"] / k,
            "consumer_prefill_request_s": r["t_oracle"] / k}
        print(f"  {name:<12} {row['f1_scd']:6.3f} {row['f1_oracle']:7.3f} {row['same_answer']:6.3f} "
              f"{row['reused_token_fraction']:7.3f} {row['low_margin_fallback_rate']:6.3f} "
              f"{row['consumer_request_s'] * 1e3:9.0f} {row['consumer_prefill_request_s'] * 1e3:11.0f}")
    report["store_stats"] = engine.store.stats()["adapters"]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, **provenance({"demo_n": n})}, indent=2))
        print(f"  report: {out}")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sgl_scd.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producer", default="base", help="producer model spec (default base)")
    p.add_argument("--encoder", default=str(DEFAULT_ENCODER),
                   help="the published encoder dir (default %(default)s; env SCD_ENCODER)")
    p.add_argument("--consumer", action="append", default=[], metavar="ADAPTER",
                   help="serve this adapter (a name under adapters/ or a dir); repeatable. Default: every adapter "
                        "calibrated against the encoder")
    p.add_argument("--store-url", default=None,
                   help="embedded:// (default), embedded:///path, redis://host:port/db, rediss://, "
                        "redis+cluster://host:port (env SCD_STORE_URL)")
    p.add_argument("--cache-salt", default="", help="tenant salt: separates store namespaces")
    p.add_argument("--ttl", type=float, default=86400.0, help="seconds a published page lives (default 1 day)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--min-margin", type=float, default=None,
                   help="prefill instead of reusing when the rebuilt cache's first answer token is a near-tie: "
                        "top-1 minus top-2 probability below this (0 = always reuse; default: each adapter's "
                        "manifest min_margin, chosen on dev)")
    p.add_argument("--demo", type=int, metavar="N", help="run the demo workload on N prompts and exit")
    p.add_argument("--report", default="out/demo_report.json", help="demo report path")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    try:
        if args.min_margin is not None:
            check_min_margin(args.min_margin)
    except ValueError as e:
        p.error(f"--min-margin: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.store_url = resolve_url(args.store_url)
    try:
        engine = build_engine(args)
    except (FileNotFoundError, ValueError) as e:
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
    from sgl_scd.serving.server import make_server

    server = make_server(engine, args.host, args.port)
    print(f"sgl_scd serving {engine.producer.spec} (producer) and {', '.join(engine.consumers)} on "
          f"http://{args.host}:{server.server_address[1]}  store={engine.store.url}", file=sys.stderr, flush=True)
    return server


if __name__ == "__main__":
    main()
