#!/usr/bin/env python
"""Cache-hit analytics from the prefix store's counters.

Reads the counter hashes every PrefixStore writes ({prefix}:{ns}:stats:{adapter} and
{prefix}:{ns}:prefixes:{adapter}) from the store named by --store-url (or
$SCD_STORE_URL, else the embedded default), and reports per identity and consumer
adapter: fetch (retrieve) and lookup (probe) hit rates, tokens served from codes,
bytes read, the raw-KV bytes those tokens would have cost and the bytes saved, the
most served prefixes, and misses / write errors by cause.

Outputs: a text table on stdout (or one JSON document with --json), and PNG plots
in --plots-dir unless --no-plots. Exit status 2 if the store cannot be read.

Raw-KV bytes per token default to the demo model: 30 layers x 2 (K, V) x 3 KV heads
x 64 dims x 2 bytes (bf16) = 23040.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from sgl_scd.store import URL_ENV, resolve_url
from sgl_scd.store.backends import open_backend
from sgl_scd.store.errors import StoreUnavailable
from sgl_scd.store.keys import parse_counter_key
from sgl_scd.store.stats import derived

DEMO_RAW_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # 23040


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store-url", default=None,
                   help=f"store URL (embedded://..., redis://..., redis+cluster://...); "
                        f"default: ${URL_ENV}, else embedded:// (the user cache dir)")
    p.add_argument("--key-prefix", default="scd", help="key prefix the stores use (default scd)")
    p.add_argument("--raw-kv-bytes-per-token", type=int, default=DEMO_RAW_KV_BYTES_PER_TOKEN,
                   help="bytes of raw KV per token, for 'bytes saved' (default %(default)s: "
                        "the demo model, 30 layers x 2 x 3 heads x 64 dims x 2 B)")
    p.add_argument("--top", type=int, default=10, help="how many top prefixes to list")
    p.add_argument("--plots-dir", type=Path, default=Path("out/cache_report"),
                   help="where PNG plots go (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = p.parse_args(argv)
    if args.raw_kv_bytes_per_token <= 0:
        p.error(f"--raw-kv-bytes-per-token={args.raw_kv_bytes_per_token}: must be > 0")
    if args.top < 0:
        p.error(f"--top={args.top}: must be >= 0")
    return args


def build_report(url: str, key_prefix: str, raw_kv_bytes_per_token: int, top: int) -> dict:
    """Read the store's counters and compute the report. Raises StoreUnavailable."""
    backend = open_backend(url)
    try:
        hashes = backend.read_counters(f"{key_prefix}:")
        info = backend.info()
        by_ns: dict[str, dict[str, dict]] = defaultdict(lambda: {"stats": {}, "prefixes": {}})
        for key, fields in hashes.items():
            parsed = parse_counter_key(key)
            if parsed is not None and parsed.prefix == key_prefix:
                by_ns[parsed.namespace][parsed.kind][parsed.adapter] = fields
        namespaces = sorted(by_ns)
        descs = backend.get_many([f"{key_prefix}:{ns}:identity" for ns in namespaces])
    finally:
        backend.close()

    identities = []
    totals: dict[str, int] = defaultdict(int)
    for ns, raw_desc in zip(namespaces, descs, strict=True):
        desc = _parse_descriptor(raw_desc)
        page_size = desc.get("page_size") if desc else None
        adapters = []
        for adapter, counters in sorted(by_ns[ns]["stats"].items()):
            figures = derived(counters, raw_kv_bytes_per_token)
            adapters.append({
                "adapter": adapter,
                "fetches": counters.get("fetches", 0),
                "lookups": counters.get("lookups", 0),
                "tokens_asked": counters.get("fetch_tokens", 0),
                "tokens_served": counters.get("hit_tokens", 0),
                "bytes_read": counters.get("bytes_read", 0),
                "bytes_written": counters.get("bytes_written", 0),
                **figures,
                "counters": counters,
            })
            for name in ("fetch_tokens", "hit_tokens", "bytes_read", "bytes_written"):
                totals[name] += counters.get(name, 0)
            for cause, n in figures["misses_by_cause"].items():
                totals[f"miss:{cause}"] += n
        prefixes = []
        for adapter, fields in by_ns[ns]["prefixes"].items():
            for field, requests in fields.items():
                depth, _, hash16 = field.partition(":")
                if not depth.isdigit():
                    continue
                tokens = int(depth) * page_size if page_size else None
                prefixes.append({
                    "adapter": adapter, "pages": int(depth), "tokens": tokens,
                    "last_page_hash16": hash16, "requests": requests,
                    "tokens_served": tokens * requests if tokens is not None else None,
                })
        prefixes.sort(key=lambda r: (-(r["tokens_served"] or r["requests"]), r["last_page_hash16"]))
        identities.append({
            "namespace": ns, "identity": desc, "adapters": adapters, "top_prefixes": prefixes[:top],
        })
    served = totals["hit_tokens"]
    return {
        "store": {"url": url, **info},
        "config": {"key_prefix": key_prefix, "raw_kv_bytes_per_token": raw_kv_bytes_per_token},
        "identities": identities,
        "totals": {
            **dict(sorted(totals.items())),
            "fetch_hit_rate": served / totals["fetch_tokens"] if totals["fetch_tokens"] else None,
            "raw_kv_bytes_equivalent": served * raw_kv_bytes_per_token,
            "bytes_saved_vs_raw_kv": served * raw_kv_bytes_per_token - totals["bytes_read"],
        },
    }


def _parse_descriptor(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        desc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return desc if isinstance(desc, dict) else None


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """Hit rate, bytes (read vs raw-KV equivalent) and misses by cause, per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{i['namespace'][:8]}/{a['adapter']}", a)
            for i in report["identities"] for a in i["adapters"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if not rows:
        return paths
    labels = [name for name, _ in rows]
    width = max(6.0, 1.2 * len(rows))

    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(labels, [a["fetch_hit_rate"] or 0.0 for _, a in rows], color="tab:green")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fetched tokens / asked tokens")
    ax.set_title("Store hit rate per adapter")
    paths.append(_save(fig, out_dir / "hit_rate_by_adapter.png"))

    fig, ax = plt.subplots(figsize=(width, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [a["raw_kv_bytes_equivalent"] / 2**20 for _, a in rows],
           width=0.4, label="raw KV equivalent")
    ax.bar([x + 0.2 for x in xs], [a["bytes_read"] / 2**20 for _, a in rows], width=0.4,
           label="codes read")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("MiB")
    ax.set_title("Bytes for the tokens served from codes")
    ax.legend()
    paths.append(_save(fig, out_dir / "bytes_by_adapter.png"))

    causes = sorted({c for _, a in rows for c in a["misses_by_cause"]})
    fig, ax = plt.subplots(figsize=(width, 4))
    bottom = [0] * len(rows)
    for cause in causes:
        values = [a["misses_by_cause"].get(cause, 0) for _, a in rows]
        ax.bar(labels, values, bottom=bottom, label=cause)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("requests")
    ax.set_title("Misses by cause")
    if causes:
        ax.legend(fontsize="small")
    paths.append(_save(fig, out_dir / "misses_by_cause.png"))
    return paths


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_tables(report: dict, out: Any = sys.stdout) -> None:
    store = report["store"]
    print(f"store: {store['url']}  backend={store.get('backend')}  keys={store.get('keys')}  "
          f"used={_fmt_bytes(int(store.get('used_memory', 0)))}  "
          f"evicted={store.get('evicted_keys', '-')}", file=out)
    header = (f"{'identity':<10} {'adapter':<16} {'fetches':>8} {'hit rate':>9} "
              f"{'probe hit':>9} {'tokens served':>14} {'codes read':>11} {'raw KV eq.':>11} "
              f"{'saved':>11} {'written':>11}  misses by cause")
    print(header, file=out)
    print("-" * len(header), file=out)
    for ident in report["identities"]:
        for a in ident["adapters"]:
            misses = ", ".join(f"{c}={n}" for c, n in a["misses_by_cause"].items()) or "-"
            print(f"{ident['namespace'][:10]:<10} {a['adapter']:<16} {a['fetches']:>8} "
                  f"{_pct(a['fetch_hit_rate']):>9} {_pct(a['lookup_hit_rate']):>9} "
                  f"{a['tokens_served']:>14} {_fmt_bytes(a['bytes_read']):>11} "
                  f"{_fmt_bytes(a['raw_kv_bytes_equivalent']):>11} "
                  f"{_fmt_bytes(a['bytes_saved_vs_raw_kv']):>11} "
                  f"{_fmt_bytes(a['bytes_written']):>11}  {misses}", file=out)
    t = report["totals"]
    print(f"total: hit rate {_pct(t['fetch_hit_rate'])}, {t.get('hit_tokens', 0)} tokens served, "
          f"{_fmt_bytes(t['bytes_saved_vs_raw_kv'])} saved vs raw KV "
          f"({report['config']['raw_kv_bytes_per_token']} B/token)", file=out)
    for ident in report["identities"]:
        if not ident["top_prefixes"]:
            continue
        desc = ident["identity"] or {}
        print(f"\ntop prefixes of {ident['namespace'][:10]} "
              f"({desc.get('producer_model', 'unknown identity')}):", file=out)
        print(f"  {'adapter':<16} {'pages':>6} {'tokens':>7} {'requests':>9} {'tokens served':>14}"
              f"  last page hash", file=out)
        for p in ident["top_prefixes"]:
            print(f"  {p['adapter']:<16} {p['pages']:>6} {p['tokens'] or '-':>7} "
                  f"{p['requests']:>9} {p['tokens_served'] or '-':>14}  {p['last_page_hash16']}",
                  file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = resolve_url(args.store_url)
    try:
        report = build_report(url, args.key_prefix, args.raw_kv_bytes_per_token, args.top)
    except StoreUnavailable as exc:
        print(f"cache_report: cannot read the store at {url}: {exc}", file=sys.stderr)
        return 2
    report["plots"] = [] if args.no_plots else write_plots(report, args.plots_dir)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print_tables(report)
        for path in report["plots"]:
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
