#!/usr/bin/env python
"""How much of a consumer's patch-layer input can a per-token map recover, and from what?

For one layer, ridge maps (closed form, unquantized codes) from different producer features of
the same token to the consumer's normalized input there; then, per held-out ToMi item, that
layer's K/V computed from the prediction (every other layer the consumer's own) and the KL to the
oracle at the first answer token. Features: the producer's normalized input at the layer alone,
at a band of layers around it, and with the previous token's. If wider features cut the KL, the
information is on the wire's side but the patch predictor does not read it; if no per-token
feature does, the consumer's input depends on what its own attention did across tokens, and only
recomputation gets it. One JSON line per feature set with --json (config, git SHA, machine).

  python scripts/patch_predictability.py --layer 23 --n-fit 96 --n 100 --json out/predictability.jsonl
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from sgl_scd.codec.factor import ridge
from sgl_scd.demo import data
from sgl_scd.evaluation.quality import kl_divergence
from sgl_scd.hf import models, runtime
from sgl_scd.runinfo import write_jsonl


def parse_features(spec: str, num_layers: int) -> dict[str, tuple[list[int], bool]]:
    """"23;22-24;16-29;23+prev" -> {name: (layers, with the previous token's too)}."""
    out = {}
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        body, prev = (part[:-5], True) if part.endswith("+prev") else (part, False)
        try:
            layers = []
            for r in body.split(","):
                lo, _, hi = r.partition("-")
                layers += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"bad feature set {part!r}: want layers like 23, 22-24 or 18,23, optionally +prev") from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers:
            raise ValueError(f"feature set {part!r} names layers outside [0, {num_layers}): {bad}")
        out[part] = (layers, prev)
    return out


def features(h_in: torch.Tensor, layers: list[int], prev: bool) -> torch.Tensor:
    """[T, len(layers) * d] (and the previous token's, the first token repeating itself)."""
    x = torch.cat([h_in[i].float() for i in layers], 1)
    return torch.cat([x, torch.cat([x[:1], x[:-1]])], 1) if prev else x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=23, help="patch layer to predict (default 23)")
    p.add_argument("--features", default="23;22-24;16-29;23+prev",
                   help="producer feature sets, ';'-separated (default 23;22-24;16-29;23+prev)")
    p.add_argument("--n-fit", type=int, default=96, help="ToMi calibration prompts for the ridge maps (default 96)")
    p.add_argument("--n", type=int, default=100, help="held-out ToMi test items (default 100)")
    p.add_argument("--consumer", default="demo-ft", help="consumer spec (default demo-ft)")
    p.add_argument("--json", help="write JSON lines here")
    args = p.parse_args()
    producer, consumer = models.load("base"), models.load(args.consumer)
    n_layers = runtime.num_layers(consumer.model)
    if not 0 <= args.layer < n_layers:
        p.error(f"--layer must be in [0, {n_layers}), got {args.layer}")
    if args.n < 1 or args.n_fit < 1:
        p.error(f"--n and --n-fit must be >= 1, got {args.n} and {args.n_fit}")
    try:
        sets = parse_features(args.features, n_layers)
    except ValueError as e:
        p.error(str(e))
    tok = consumer.tokenizer
    xs: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
    ys = []
    with torch.inference_mode():
        for item in tqdm(data.load_tomi("train")[1000 : 1000 + args.n_fit], desc="capture"):
            ids = data.prompt_ids(tok, item)
            ph = runtime.capture_prefill(producer.model, ids, hidden=True).h_in
            ys.append(runtime.capture_prefill(consumer.model, ids, hidden=True).h_in[args.layer].float())
            for name, (layers, prev) in sets.items():
                xs[name].append(features(ph, layers, prev))
    y = torch.cat(ys)
    maps = {name: ridge(torch.cat(xs.pop(name)), y) for name in sets}
    kl = dict.fromkeys(sets, 0.0)
    items = data.load_tomi("test")[: args.n]
    with torch.inference_mode():
        for item in tqdm(items, desc="held-out"):
            ids = data.prompt_ids(tok, item)
            ph = runtime.capture_prefill(producer.model, ids, hidden=True).h_in
            own = runtime.capture_prefill(consumer.model, ids, hidden=True)
            for name, (w, b) in maps.items():
                k, v = own.k[:, :-1].clone(), own.v[:, :-1].clone()
                h = (features(ph, *sets[name]) @ w + b)[:-1]
                k[args.layer], v[args.layer] = runtime.project_kv(consumer.model, args.layer, h)
                logits = runtime.continue_from_kv(consumer.model, tok, ids, k, v, max_new_tokens=0).first_logits
                kl[name] += kl_divergence(own.last_logits, logits) / len(items)
    rows = [{"layer": args.layer, "features": name, "producer_layers": sets[name][0], "previous_token": sets[name][1],
             "n_fit": args.n_fit, "n": len(items), "kl": kl[name]} for name in sets]
    print(f"| producer features -> consumer's L{args.layer} input | KL (only L{args.layer} predicted) |\n|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['kl']:.4f} |")
    if args.json:
        write_jsonl(args.json, rows, vars(args))


if __name__ == "__main__":
    main()
