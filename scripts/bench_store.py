#!/usr/bin/env python
"""Prefix-store throughput and latency: PrefixStore.publish (put) and fetch_prefix (get).

For each backend (embedded SQLite, Redis), value size (code pages as the demo encoder writes them,
16 tokens x ~5,480 B = ~88 KB at 0.238x raw bf16 KV, or the size of a given --encoder's pages; and
raw-KV-sized 23040 B/token x 16 tokens = 368,640 B pages) and batch size (pages per
call), it times one publish and one fetch per iteration on the same batch of keys
(overwritten in place, so memory stays bounded) and reports payload GB/s and p50/p99
call latency. Each result is one JSON line carrying the config, git SHA and machine.

Iterations per config: enough to move --budget-mb of payload, clamped to
[--min-iters, --max-iters], after one untimed warm-up call. Defaults finish in about a
minute on a laptop. Keys are written under a random prefix and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

from sgl_scd.store import PrefixStore, StoreIdentity, StoreMetrics, Timeouts
from sgl_scd.store.backends import open_backend
from sgl_scd.store.errors import StoreUnavailable

REPO = Path(__file__).resolve().parents[1]
# 16-token pages of the demo model: SCD codes at 5,474 B/token + the 40-byte wire frame, raw bf16 K+V
SIZES = {"code": 5474 * 16 + 40, "rawkv": 23040 * 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", metavar="OUT", default="-",
                   help="append JSON lines to OUT ('-' = stdout, the default)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                   help="Redis to measure (default %(default)s)")
    p.add_argument("--backends", default="embedded,redis",
                   help="comma list of embedded, redis (default %(default)s)")
    p.add_argument("--sizes", default="code,rawkv",
                   help="comma list of code (87624 B, the demo's 16-token code page), rawkv (368640 B) or "
                        "byte counts")
    p.add_argument("--encoder", metavar="DIR",
                   help="measure 'code' at this encoder's real page size (its payload B/token x page size)")
    p.add_argument("--batches", default="1,8,32,128", help="pages per call (default %(default)s)")
    p.add_argument("--budget-mb", type=float, default=128.0,
                   help="payload MB to move per (backend, size, batch, op) (default %(default)s)")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=200)
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b not in ("embedded", "redis"):
            p.error(f"--backends: unknown backend {b!r} (embedded, redis)")
    sizes = dict(SIZES)
    if args.encoder:
        man = json.loads((Path(args.encoder) / "encoder.json").read_text())
        sizes["code"] = round(man["payload_bytes_per_token"] * man["page_size"])
    try:
        args.sizes = [(s, sizes[s]) if s in sizes else (f"{int(s)}B", int(s))
                      for s in args.sizes.split(",") if s]
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError as exc:
        p.error(f"--sizes/--batches: {exc}")
    if any(b < 1 for b in args.batches) or any(n < 1 for _, n in args.sizes):
        p.error("--sizes and --batches must be positive")
    if not 1 <= args.min_iters <= args.max_iters:
        p.error(f"need 1 <= --min-iters ({args.min_iters}) <= --max-iters ({args.max_iters})")
    return args


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def machine() -> dict:
    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_one(store: PrefixStore, size: int, batch: int, iters: int) -> dict[str, dict]:
    """Time iters publishes then iters fetches of one batch; returns figures per op."""
    hashes = [os.urandom(32).hex() for _ in range(batch)]
    payloads = [os.urandom(size) for _ in range(batch)]
    out: dict[str, dict] = {}
    for op in ("put", "get"):
        call = (lambda: store.publish(hashes, payloads)) if op == "put" else (
            lambda: len(store.fetch_prefix(hashes)))
        if call() != batch:  # warm-up; also checks the backend took / returned every page
            raise StoreUnavailable(f"{op} of {batch} pages moved fewer pages", cause="bench")
        lat = []
        t_start = time.perf_counter()
        for _ in range(iters):
            t0 = time.perf_counter()
            n = call()
            lat.append(time.perf_counter() - t0)
            if n != batch:
                raise StoreUnavailable(f"{op} moved {n}/{batch} pages", cause="bench")
        total = time.perf_counter() - t_start
        moved = iters * batch * size
        out[op] = {
            "iters": iters,
            "gbps": moved / total / 1e9,
            "pages_per_s": iters * batch / total,
            "p50_ms": 1e3 * percentile(lat, 0.50),
            "p99_ms": 1e3 * percentile(lat, 0.99),
            "mean_ms": 1e3 * statistics.fmean(lat),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sink = sys.stdout if args.json == "-" else open(args.json, "a")  # noqa: SIM115
    common = {"bench": "store", "git_sha": git_sha(), "machine": machine(),
              "path": "PrefixStore.publish/fetch_prefix"}
    identity = StoreIdentity("bench/model", "r0", "bench-tok", 16, "bench-codec", "bfloat16")
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    tmp = tempfile.TemporaryDirectory(prefix="bench_store_")
    urls = {"embedded": f"embedded://{tmp.name}?max_bytes=4GiB", "redis": args.redis_url}
    try:
        for backend_name in args.backends:
            backend = open_backend(urls[backend_name], Timeouts(connect_s=1.0, op_s=30.0))
            store = PrefixStore(backend, identity, key_prefix=prefix, ttl_s=600,
                                metrics=StoreMetrics(CollectorRegistry()), stats_flush_s=3600)
            try:
                for size_name, size in args.sizes:
                    for batch in args.batches:
                        budget_iters = int(args.budget_mb * 1e6 / (size * batch))
                        iters = max(args.min_iters, min(args.max_iters, budget_iters))
                        config = {"backend": backend_name, "url": backend.url,
                                  "value_kind": size_name, "value_bytes": size,
                                  "batch_pages": batch, "record_header_bytes": 84}
                        try:
                            results = bench_one(store, size, batch, iters)
                        except StoreUnavailable as exc:
                            line = {**common, "config": config, "error": str(exc)}
                            print(json.dumps(line), file=sink, flush=True)
                            continue
                        for op, figures in results.items():
                            line = {**common, "config": {**config, "op": op}, **figures,
                                    "time": time.time()}
                            print(json.dumps(line), file=sink, flush=True)
            finally:
                store.close()
                _cleanup(backend_name, args.redis_url, prefix)
    finally:
        tmp.cleanup()
        if sink is not sys.stdout:
            sink.close()
    return 0


def _cleanup(backend_name: str, redis_url: str, prefix: str) -> None:
    """Delete the benchmark's keys from Redis (the embedded store lives in a temp dir)."""
    if backend_name != "redis":
        return
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
    except redis.exceptions.RedisError as exc:
        print(f"bench_store: could not delete {prefix}:* from {redis_url}: {exc}",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
