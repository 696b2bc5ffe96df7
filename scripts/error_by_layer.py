#!/usr/bin/env python
"""Where in the rebuilt cache does SCD's error sit? Per held-out ToMi item, the KL to the oracle
at the first answer token when the rebuilt K/V of some layers are swapped for the consumer's own
(exact) K/V: each layer alone, every layer's K or V alone, the reuse and the patch layers; and
the patch layers' K/V from the consumer's own normalized inputs sent through their codes (a
perfect predictor behind the same bytes: the quantization's share). A layer whose exact K/V
removes much of the KL is where better decoders, more bytes or recomputation would pay; one
that removes little is not worth them. Prints a table, most KL removed first; --json writes one
line per swap (config, git SHA, machine); --png a bar chart.

  python scripts/error_by_layer.py --n 100 --json out/error_by_layer.jsonl --png out/error_by_layer.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_scd.codec.codec import Slot
from sgl_scd.codec.manifest import load_with_models
from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.evaluation.methods import encode_prompt, rebuild_kv
from sgl_scd.evaluation.quality import kl_divergence
from sgl_scd.hf import runtime
from sgl_scd.runinfo import write_jsonl

VIA_WIRE = "patch layers via wire"


def swaps(num_layers: int, patch: list[int]) -> dict[str, tuple[list[int], str]]:
    """name -> (layers whose rebuilt K/V are replaced by the consumer's own, which of "kv"/"k"/"v")."""
    every = list(range(num_layers))
    out = {"none": ([], "kv"), "all": (every, "kv"), "all K": (every, "k"), "all V": (every, "v"),
           "reuse layers": ([i for i in every if i not in patch], "kv"), "patch layers": (patch, "kv")}
    if patch:
        out[VIA_WIRE] = (patch, "kv")
    out.update({f"L{i:02d}": ([i], "kv") for i in every})
    return out


def through_wire(adapter, consumer_model, own_h: torch.Tensor, patch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch layers' K/V [P, T, H, D] from the consumer's own normalized inputs sent through each
    patch slot's code (the producer's basis, whitening and quantizer): a perfect predictor
    behind the same bytes, so what is left is the quantization's share of the error."""
    ks, vs = [], []
    for layer in patch:
        e = adapter.encoder.slots[Slot(layer, "h")]
        z = e.dequantize(e.encode(own_h[layer]))
        k, v = runtime.project_kv(consumer_model, layer, e.unwhiten(z))
        ks.append(k)
        vs.append(v)
    return torch.stack(ks), torch.stack(vs)


def swapped(rebuilt: torch.Tensor, own: torch.Tensor, layers: list[int]) -> torch.Tensor:
    out = rebuilt.clone()
    out[layers] = own[layers]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="held-out ToMi test items (default 100)")
    p.add_argument("--consumer", default="demo-ft", help="consumer spec (default demo-ft)")
    p.add_argument("--adapter", help="adapter directory (default adapters/<consumer>)")
    p.add_argument("--json", help="write JSON lines here")
    p.add_argument("--png", help="write a bar chart of the KL left with each layer exact")
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    producer, consumer, adapter = load_with_models(args.consumer, args.adapter)
    patch = adapter.encoder.patch_layers
    table = swaps(runtime.num_layers(consumer.model), patch)
    kl = {name: 0.0 for name in table}
    flips = {name: 0 for name in table}
    items = data.load_tomi("test")[: args.n]
    for item in tqdm(items, desc="error by layer"):
        pi = evaluate.PairItem(producer, consumer, item, data.prompt_ids(producer.tokenizer, item))
        k, v = rebuild_kv(adapter, consumer.model, encode_prompt(adapter, pi.producer_capture))
        full = runtime.capture_prefill(consumer.model, pi.ids, hidden=True)  # the oracle, one prefill
        oracle, own_k, own_v = full.last_logits, full.k[:, :-1], full.v[:, :-1]  # K/V as rebuilt: all but the last
        if patch:  # "patch layers via wire": the consumer's own h, quantized like the producer's code
            wire_k, wire_v = own_k.clone(), own_v.clone()
            wire_k[patch], wire_v[patch] = through_wire(adapter, consumer.model, full.h_in[:, :-1], patch)
        for name, (layers, which) in table.items():
            src_k, src_v = (wire_k, wire_v) if name == VIA_WIRE else (own_k, own_v)
            kk = swapped(k, src_k, layers) if "k" in which else k
            vv = swapped(v, src_v, layers) if "v" in which else v
            logits = runtime.continue_from_kv(consumer.model, consumer.tokenizer, pi.ids, kk, vv,
                                              max_new_tokens=0).first_logits
            kl[name] += kl_divergence(oracle, logits) / len(items)
            flips[name] += int(logits.argmax() != oracle.argmax())
    rows = [{"swap": name, "layers": layers, "which": which, "n": len(items), "kl": kl[name],
             "kl_removed_share": 1 - kl[name] / max(kl["none"], 1e-12), "flip_rate": flips[name] / len(items)}
            for name, (layers, which) in table.items()]
    print("| consumer's own K/V at | mean KL | share of SCD's KL removed | first-token flips |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["kl"]):
        print(f"| {r['swap']} | {r['kl']:.4f} | {r['kl_removed_share']:.2f} | {r['flip_rate']:.3f} |")
    if args.json:
        write_jsonl(args.json, rows, vars(args))
    if args.png:
        plot(rows, patch, args.png)


def plot(rows: list[dict], patch: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = [r for r in rows if r["swap"].startswith("L")]
    none = next(r["kl"] for r in rows if r["swap"] == "none")
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar([r["layers"][0] for r in per_layer], [none - r["kl"] for r in per_layer],
           color=["tab:orange" if r["layers"][0] in patch else "tab:blue" for r in per_layer])
    ax.set_xlabel("layer whose rebuilt K/V is replaced by the consumer's own (orange: patch layer)")
    ax.set_ylabel("KL removed (nats)")
    ax.set_title(f"SCD first-answer-token KL {none:.3f} on {per_layer[0]['n']} ToMi items: what one exact layer removes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
