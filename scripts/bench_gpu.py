#!/usr/bin/env python
"""SCD's device path at real model sizes, beside the consumer's own prefill (CPU or GPU).

Per model shape, prompt length T and batch B (B sequences of T tokens, each followed by a
--suffix-token question), in one run, median of --repeats after a warm-up:
  prefill_s   the consumer's own prefill of T + suffix tokens (the oracle's TTFT)
  prefix_s    a prefill of the T shared tokens (what the producer pays before it encodes)
  encode_s    producer: codes of K (after RoPE) / V / h on the device, pages packed, copied to the
              host and framed (checksum): what it publishes
  validate_s  consumer: every fetched page's frame and checksum on the host (a thread per core)
  h2d_s       consumer: the payloads to the device (0 on CPU)
  unpack_s    consumer: payloads -> integer codes (torch ops on a GPU, numpy on CPU: the paths
              each serves with)
  rebuild_s   consumer: the folded decoder, codes -> its K/V of every layer (RoPE, patch layers'
              predictors and its own projections), the B requests in one pass per layer
  suffix_s    consumer: the suffix run on the rebuilt cache (the transformers cache built from it)
  ttft_s[bw]  = payload / bw + validate + h2d + unpack + rebuild + suffix, at --gbps link speeds;
              speedup[bw] = prefill_s / ttft_s[bw]
Physical figures beside them: unpack GB/s (payload read + codes written) and rebuild / prefill
TFLOP/s, as fractions of the device's peaks where known. With --adapters N, N consumers decode
one fetched code set (validate + h2d + unpack once, rebuild + suffix per consumer) against N
prefills: the multi-adapter case.

Weights are random (the arithmetic of a real model of the shape; nothing is downloaded): the
model is a transformers Llama of the shape, the codec has the demo code set's ranks and bits per
dimension and its patch-layer depths, scaled to the shape (sgl_scd.evaluation.shapes). With
--adapter DIR, SmolLM2-135M uses that calibrated adapter's own encoder and folded decoder. Every
JSON line says so (weights, codec_source).

  python scripts/bench_gpu.py --json out/bench_gpu.jsonl --plot out/bench_gpu.png
  python scripts/bench_gpu.py --adapters 1,2,4,8 --tokens 1024 --json out/bench_adapters.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare copy of the repo too

from sgl_scd.codec import quant, wire
from sgl_scd.codec.device import DeviceEncoder, PageLayout
from sgl_scd.codec.manifest import load_adapter
from sgl_scd.codec.states import ProducerStates
from sgl_scd.evaluation.shapes import (
    DEMO_PROFILE,
    SHAPES,
    CodecProfile,
    random_model,
    synthetic_codec,
)
from sgl_scd.runinfo import provenance

PAGE = 16
# (HBM GB/s, dense bf16 TFLOP/s) from the vendors' data sheets, by device name
PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0), "L40S": (864.0, 362.0)}


def ints(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, *args):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0


def rebuild_flops(fold, tokens: int) -> float:
    flops = 0.0
    for steps in fold.plan:
        for st in steps:
            flops += 2 * tokens * st.a.shape[0] * st.a.shape[1]
            flops += sum(2 * tokens * (m.up.shape[0] * m.up.shape[1] + m.down.shape[0] * m.down.shape[1])
                         for m in st.mlps)
    return flops


def validate(blobs: list[bytes], enc, digest: bytes, pool: ThreadPoolExecutor) -> bytes:
    """Check every page's frame and checksum as the consumer does before trusting them (zlib
    releases the GIL: one thread per core) and join the payloads."""
    check = lambda i, b: wire._check_page(enc, b, digest, i, PAGE)[1]
    return b"".join(pool.map(check, range(len(blobs)), blobs,
                             chunksize=max(1, len(blobs) // (4 * pool._max_workers))))


def measure(model, enc, folds, timer, pool, tokens: int, batch: int, suffix: int, repeats: int, device, dtype,
            gbps: list[float]) -> dict:
    """One (T, B) point: every stage, median of repeats after one warm-up."""
    cfg = model.config
    layers, heads, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    n = batch * tokens
    g = torch.Generator(device="cpu").manual_seed(tokens + batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens + suffix), generator=g).to(device)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    states = ProducerStates(rnd(layers, n, heads, hd), rnd(layers, n, heads, hd),
                            {layer: rnd(n, cfg.hidden_size) for layer in enc.patch_layers}, enc.theta)
    denc, layout = DeviceEncoder(enc, device), PageLayout(enc.widths_array(), PAGE, device)  # fp32, as served
    widths = enc.widths_array()
    digest = b"\0" * 16
    positions = torch.arange(tokens).repeat(batch)
    kbuf = torch.empty(layers, n, heads, hd, device=device, dtype=dtype)
    vbuf = torch.empty_like(kbuf)

    def encode():  # what reuse.Publisher(device=) does, store aside
        return wire.frame_pages(layout.pack(denc.encode(states)).cpu().numpy(), digest, PAGE)

    def rebuild(fold, codes):
        split, tables = enc.split(codes), fold.rope_tables(positions)
        for layer in range(layers):
            fold.rebuild_layer(layer, split, tables=tables, out=(kbuf[layer], vbuf[layer]))

    def run_suffix():
        from transformers import DynamicCache

        cache = DynamicCache(config=cfg)
        for layer in range(layers):
            cache.update(kbuf[layer].view(batch, tokens, heads, hd).transpose(1, 2),
                         vbuf[layer].view(batch, tokens, heads, hd).transpose(1, 2), layer)
        return model(ids[:, tokens:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    with torch.inference_mode():
        stages = {k: [] for k in ("prefill_s", "prefix_s", "encode_s", "validate_s", "h2d_s", "unpack_s",
                                  "rebuild_s", "suffix_s")}
        for rep in range(repeats + 1):  # the first round warms up
            t = {}
            _, t["prefill_s"] = timer(lambda: model(ids, use_cache=True, logits_to_keep=1).logits)
            _, t["prefix_s"] = timer(lambda: model(ids[:, :tokens], use_cache=True, logits_to_keep=1).logits)
            blobs, t["encode_s"] = timer(encode)
            payload, t["validate_s"] = timer(validate, blobs, enc, digest, pool)
            host = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(-1, layout.page_bytes)
            if device.type == "cuda":  # torch ops on the GPU (codec/device.py)
                host = host.pin_memory()
                dev, t["h2d_s"] = timer(lambda h: h.to(device, non_blocking=True), host)
                codes, t["unpack_s"] = timer(layout.unpack, dev)
            else:  # the CPU's own path: numpy's strided unpack beats a gather there
                dev, t["h2d_s"] = host, 0.0
                codes, t["unpack_s"] = timer(lambda h: torch.from_numpy(quant.unpack_pages(
                    list(h.numpy()), PAGE, widths)), host)
            rebuilds, suffixes = [], []
            for fold in folds:  # N adapters decode the one fetched code set
                _, s = timer(rebuild, fold, codes)
                rebuilds.append(s)
                _, s = timer(run_suffix)
                suffixes.append(s)
            t["rebuild_s"], t["suffix_s"] = sum(rebuilds), sum(suffixes)
            if rep:
                for k, v in t.items():
                    stages[k].append(v)
    row = {k: statistics.median(v) for k, v in stages.items()}
    nad = len(folds)
    payload_bytes = sum(map(len, blobs))
    shared = row["validate_s"] + row["h2d_s"] + row["unpack_s"]
    per_adapter = (row["rebuild_s"] + row["suffix_s"]) / nad
    row.update(
        tokens=tokens, batch=batch, suffix=suffix, adapters=nad, payload_bytes=payload_bytes,
        payload_ratio=payload_bytes / (n * 2 * layers * heads * hd * 2),
        rebuild_suffix_ratio=per_adapter / row["prefill_s"],
        compute_ratio=(shared / nad + per_adapter) / row["prefill_s"],
        encode_ratio=row["encode_s"] / row["prefix_s"],
        unpack_gbs=(dev.numel() + codes.numel()) / row["unpack_s"] / 1e9,
        rebuild_tflops=rebuild_flops(folds[0], n) * nad / row["rebuild_s"] / 1e12,
        ttft_s={}, speedup={},
    )
    for bw in gbps:
        ttft = payload_bytes * 8 / (bw * 1e9) + shared / nad + per_adapter
        row["ttft_s"][f"{bw:g}"] = ttft
        row["speedup"][f"{bw:g}"] = row["prefill_s"] / ttft
    return row


def codec_for(shape, args, device, dtype):
    """(encoder, [folded decoder per adapter], codec source) for a shape."""
    adapter = load_adapter(Path(args.adapter)) if args.adapter else None
    if adapter is not None and shape == SHAPES["smollm2-135m"] and not args.decoder_context:
        proj = adapter.projections()
        if proj is None:
            raise SystemExit(f"{args.adapter} has no projections.safetensors: recalibrate it (make adapters-quick)")
        folds = [adapter.fold(proj).to(device, dtype) for _ in range(args.adapters_n)]
        return adapter.encoder.codec, folds, str(adapter.path)
    profile = CodecProfile.of(adapter) if adapter is not None else DEMO_PROFILE
    if args.decoder_context:
        profile = dataclasses.replace(profile, context=args.decoder_context)
    made = [synthetic_codec(shape, profile, seed=i) for i in range(args.adapters_n)]
    return made[0][0], [f.to(device, dtype) for _, f in made], f"synthetic, scaled from {profile.source}"


def peaks(device: torch.device) -> tuple[float | None, float | None, str]:
    if device.type != "cuda":
        return None, None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((p for k, p in PEAKS.items() if k in name), (None, None)) + (name,)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma-separated, of {sorted(SHAPES)} (default: all on a GPU, "
                                    "smollm2-135m on CPU)")
    p.add_argument("--tokens", type=ints, help="shared-prefix lengths (default: GPU 1024..32768, CPU 256..8192)")
    p.add_argument("--batch", type=ints, default=None, help="batch sizes (default: GPU 1,8; CPU 1)")
    p.add_argument("--max-batch-tokens", type=int, default=65536,
                   help="skip points with batch x tokens above this (default 65536)")
    p.add_argument("--adapters", type=ints, default=[1], help="consumers decoding one code set (default 1)")
    p.add_argument("--suffix", type=int, default=32, help="question tokens after the shared prefix (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point, median kept (default 3)")
    p.add_argument("--gbps", type=floats, default=floats("10,25,100,200,400"),
                   help="link speeds for TTFT, Gbit/s (default 10,25,100,200,400)")
    p.add_argument("--adapter", help="a calibrated adapter dir: SmolLM2-135M uses its codec, the other "
                                     "shapes its profile (default: the built-in demo profile)")
    p.add_argument("--decoder-context", choices=("own", "kv", "kv+h"),
                   help="time a synthetic decoder of this context instead of the profile's (what each "
                        "reuse layer's decoder reads; codec.context_inputs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new point after this many seconds (a bounded GPU lease)")
    p.add_argument("--layers", type=int, help="smoke tests only: fewer layers than the shape has")
    p.add_argument("--vocab", type=int, help="smoke tests only: a smaller vocabulary than the shape's")
    p.add_argument("--json", required=True, help="output JSON-lines file (one line per point, written as it ends)")
    p.add_argument("--plot", help="PNG of the figures (needs matplotlib)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = (args.shapes or (",".join(SHAPES) if gpu else "smollm2-135m")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known {sorted(SHAPES)}")
    tokens = args.tokens or ([1024, 2048, 4096, 8192, 16384, 32768] if gpu else [256, 512, 1024, 2048, 4096, 8192])
    if any(t % PAGE for t in tokens):
        p.error(f"--tokens must be multiples of the page size {PAGE}, got {tokens}")
    batches = args.batch or ([1, 8] if gpu else [1])
    if args.repeats < 1 or args.suffix < 1:
        p.error("--repeats and --suffix must be >= 1")
    hbm, tflops, device_name = peaks(device)
    timer, t_start = Timer(device), time.monotonic()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    with out.open("w") as f:
        for name in shapes:
            shape = dataclasses.replace(SHAPES[name], layers=args.layers or SHAPES[name].layers,
                                        vocab=args.vocab or SHAPES[name].vocab)
            model = random_model(shape, device, dtype)
            for nad in args.adapters:
                args.adapters_n = nad
                enc, folds, source = codec_for(shape, args, device, dtype)
                for t in tokens:
                    for b in batches:
                        config = {"shape": name, "weights": "random", "codec_source": source,
                                  "decoder_context": args.decoder_context or "as calibrated", "dtype": str(dtype),
                                  "device": device_name, "page_size": PAGE, "layers": model.config.num_hidden_layers,
                                  "vocab": model.config.vocab_size, "repeats": args.repeats,
                                  "peak_hbm_gbs": hbm, "peak_bf16_tflops": tflops}
                        row = {"shape": name, "tokens": t, "batch": b, "adapters": nad}
                        if b * t > args.max_batch_tokens:
                            row["skipped"] = f"batch x tokens {b * t} > --max-batch-tokens {args.max_batch_tokens}"
                        elif time.monotonic() - t_start > args.budget_s:
                            row["skipped"] = f"past --budget-s {args.budget_s:g}"
                        else:
                            try:
                                row.update(measure(model, enc, folds, timer, pool, t, b, args.suffix, args.repeats,
                                                   device, dtype, args.gbps))
                            except torch.OutOfMemoryError as exc:
                                row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
                            finally:
                                if gpu:
                                    torch.cuda.empty_cache()
                        if "prefill_s" in row:
                            row["prefill_tflops"] = shape.prefill_flops(t + args.suffix, b) / row["prefill_s"] / 1e12
                            if hbm:
                                row["unpack_hbm_fraction"] = row["unpack_gbs"] / hbm
                                row["rebuild_peak_fraction"] = row["rebuild_tflops"] / tflops
                        rows.append(row)
                        f.write(json.dumps({**row, **provenance(config)}) + "\n")
                        f.flush()
                        print(summary(row), file=sys.stderr, flush=True)
            del model
            if gpu:
                torch.cuda.empty_cache()
    if args.plot:
        plot(rows, args.plot)


def summary(row: dict) -> str:
    head = f"{row['shape']:>13} T={row['tokens']:>6} B={row['batch']} N={row['adapters']}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    ms = lambda k: f"{row[k] * 1e3:8.1f}"
    return (f"{head} prefill {ms('prefill_s')} ms | unpack {ms('unpack_s')} rebuild {ms('rebuild_s')} "
            f"suffix {ms('suffix_s')} | (rebuild+suffix)/prefill {row['rebuild_suffix_ratio']:.3f} | "
            f"encode/prefix {row['encode_ratio']:.3f} | speedup@200G {row['speedup'].get('200', math.nan):.2f}x")


def plot(rows: list[dict], path: str) -> None:
    """Left: (rebuild + suffix) / prefill against T; middle: TTFT speedup at each link speed against
    T; right: the multi-adapter ratio against N (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "prefill_s" in r]
    multi = sorted({r["adapters"] for r in done}) != [1]
    fig, axes = plt.subplots(1, 3 if multi else 2, figsize=(16 if multi else 11, 4.2))
    series = sorted({(r["shape"], r["batch"]) for r in done if r["adapters"] == 1})
    for shape, b in series:
        pts = sorted((r["tokens"], r) for r in done if (r["shape"], r["batch"], r["adapters"]) == (shape, b, 1))
        xs = [t for t, _ in pts]
        axes[0].plot(xs, [r["rebuild_suffix_ratio"] for _, r in pts], "o-", label=f"{shape} B={b}")
        axes[1].plot(xs, [r["speedup"].get("200", math.nan) for _, r in pts], "o-", label=f"{shape} B={b} @200G")
    axes[0].set(xscale="log", xlabel="shared prefix tokens", ylabel="(rebuild + suffix) / prefill",
                title="consumer compute vs its own prefill")
    axes[1].set(xscale="log", xlabel="shared prefix tokens", ylabel="TTFT speedup vs own prefill",
                title="TTFT at 200 Gbit/s")
    axes[1].axhline(1, color="gray", lw=0.8)
    if multi:
        for shape, t in sorted({(r["shape"], r["tokens"]) for r in done if r["batch"] == min(r2["batch"] for r2 in done)}):
            pts = sorted((r["adapters"], r["compute_ratio"]) for r in done if (r["shape"], r["tokens"]) == (shape, t))
            axes[2].plot(*zip(*pts), "o-", label=f"{shape} T={t}")
        axes[2].set(xlabel="adapters decoding one code set", ylabel="SCD compute / (N prefills)",
                    title="one code set, N consumers")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
