"""Baselines measured in the same framework as SCD.

  kivi4      the producer's raw KV quantized KIVI-style to 4 bits: keys per channel (groups
             of 32 tokens), values per token (one group per head), fp16 scale + zero per group
  droidspeak DroidSpeak-style selective recompute: reuse the producer's KV for most layers and
             recompute a contiguous window [s, s+w) of consumer layers from the producer's
             residual stream entering layer s (the shipped "E-cache"); s is chosen by offline
             profiling of dev KL. The reused keys get the consumer's RoPE base (a free fix any
             implementation would apply to a RoPE-changed pair), so this baseline is not
             handicapped by the RoPE change; raw_kv shows what happens without it.

Noise-floor references (not baselines: they need the consumer's own prefill of the prefix, so
they cannot be reused across models). How far the consumer's own answer moves when its own
cache of the reused tokens is perturbed as little as serving does (bf16 rounding: a GPU pool
holds bf16) or compressed to about SCD's payload (4-bit KIVI). A codec cannot be expected to
give the adapter's answer more often than its own cache does under such a perturbation.
  own_bf16kv  the consumer's own K/V of the reused tokens rounded to bf16 (1.00x)
  own_kivi4   the consumer's own K/V of the reused tokens, 4-bit KIVI-style (~0.30x)
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from sgl_scd.codec import rope
from sgl_scd.evaluation import evaluate, quality
from sgl_scd.hf import runtime

BF16 = 2


def _quant_groups(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize of x, one (scale, zero) per slice along `dim`."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, lo = ((hi - lo) / (2**bits - 1)).half().float(), lo.half().float()  # shipped as fp16
    scale = scale.clamp_min(1e-6)  # a constant group (or an fp16 underflow) must not divide by 0
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


def kivi_quantize(k: torch.Tensor, v: torch.Tensor, bits: int = 4, group: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(k_hat, v_hat, payload bytes per token) for k, v [L, T, H, D]."""
    L, T, H, D = k.shape
    pad = (-T) % group
    kp = torch.cat([k, k[:, -1:].expand(L, pad, H, D)], 1) if pad else k
    kg = kp.view(L, -1, group, H, D)  # [L, T/g, g, H, D]: per-channel stats over g tokens
    k_hat = _quant_groups(kg, bits, 2).view(L, -1, H, D)[:, :T]
    v_hat = _quant_groups(v, bits, 3)  # per token and head, over the D channels
    per_token = L * H * D * bits / 8 * 2 + L * H * D * 2 * 2 / group + L * H * 2 * 2
    return k_hat, v_hat, per_token


def consumer_keys(p, k: torch.Tensor) -> torch.Tensor:
    """The producer's keys [L, T, H, D] re-rotated to the consumer's RoPE base (the free fix for a
    RoPE-changed pair; the identity when the bases agree)."""
    theta_c, theta_p = rope.rope_theta(p.consumer.config), p.producer_capture.theta
    return k if theta_c == theta_p else rope.rotate(rope.derotate(k, theta_p), theta_c)


def rerotated_kv(p) -> runtime.Continuation:
    """raw_kv with the keys re-rotated to the consumer's RoPE base."""
    t0 = time.perf_counter()
    k = consumer_keys(p, p.producer_capture.k)
    rebuild_s = time.perf_counter() - t0
    out = evaluate.raw_kv(p, k)
    out.timings["rebuild_s"] = rebuild_s
    return out


def kivi_method(bits: int = 4, rerotate: bool = False):
    """KIVI-style quantized producer KV; rerotate: its keys re-rotated to the consumer's RoPE base."""
    def run(p) -> runtime.Continuation:
        cap = p.producer_capture
        t0 = time.perf_counter()
        k, v, per_tok = kivi_quantize(cap.k, cap.v, bits)
        if rerotate:
            k = consumer_keys(p, k)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v)
        out.timings.update(rebuild_s=rebuild_s, payload_bytes=per_tok * cap.num_tokens, tokens=cap.num_tokens)
        return out

    return run


def own_cache_method(perturb: str):
    """A noise-floor reference: the consumer continues from its own K/V of the reused tokens,
    perturbed: "bf16" (rounded, as a bf16 pool holds them) or "kivi4" (4-bit KIVI-style)."""
    if perturb not in ("bf16", "kivi4"):
        raise ValueError(f"perturb is 'bf16' or 'kivi4', got {perturb!r}")

    def run(p) -> runtime.Continuation:
        n = p.producer_capture.num_tokens  # the same tokens the other methods reuse
        own = runtime.capture_prefill(p.consumer.model, p.ids[:n], hidden=False)
        t0 = time.perf_counter()
        if perturb == "bf16":
            k, v = own.k.bfloat16().to(own.k.dtype), own.v.bfloat16().to(own.v.dtype)
            per_tok = own.k[:, 0].numel() * BF16 * 2
        else:
            k, v, per_tok = kivi_quantize(own.k, own.v, 4)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v)
        out.timings.update(rebuild_s=rebuild_s, payload_bytes=per_tok * n, tokens=n)
        return out

    return run


@torch.inference_mode()
def recompute_window(consumer_model, resid: torch.Tensor, start: int, end: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run consumer layers [start, end) on the residual stream resid [T, hidden] entering `start`;
    returns their K (after RoPE) and V, [end - start, T, H, D]."""
    layers = consumer_model.model.layers
    t = resid.shape[0]
    h = resid[None].to(consumer_model.dtype)
    pos = torch.arange(t)[None]
    cos_sin = consumer_model.model.rotary_emb(h, pos)
    ks, vs = [], []
    for j in range(start, end):
        k, v = runtime.project_kv(consumer_model, j, layers[j].input_layernorm(h)[0])
        ks.append(k)
        vs.append(v)
        if j + 1 < end:  # the last layer's output is not needed
            h = layers[j](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
    return torch.stack(ks), torch.stack(vs)


def droidspeak_kv(p, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    cap = p.producer_capture
    k, v = consumer_keys(p, cap.k).clone(), cap.v.clone()
    kw, vw = recompute_window(p.consumer.model, cap.resid[start], start, start + width)
    k[start : start + width], v[start : start + width] = kw, vw
    return k, v


def droidspeak_payload_per_token(cfg, width: int) -> float:
    kv = cfg.num_key_value_heads * cfg.head_dim
    return (cfg.num_hidden_layers - width) * 2 * kv * BF16 + cfg.hidden_size * BF16


def droidspeak_method(start: int, width: int):
    def run(p) -> runtime.Continuation:
        t0 = time.perf_counter()
        k, v = droidspeak_kv(p, start, width)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v)
        t = k.shape[1]
        out.timings.update(rebuild_s=rebuild_s, tokens=t,
                           payload_bytes=droidspeak_payload_per_token(p.consumer.config, width) * t)
        return out

    return run


def profile_droidspeak(pairs: list, width: int) -> tuple[int, list[tuple[int, float]]]:
    """Offline profiling: mean last-token KL vs the oracle for every window start; best first."""
    oracle = [runtime.capture_prefill(p.consumer.model, p.ids, hidden=False).last_logits for p in pairs]
    n_layers = pairs[0].consumer.config.num_hidden_layers
    scores = []
    for s in tqdm(range(n_layers - width + 1), desc=f"profile DroidSpeak windows (w={width})", file=sys.stderr):
        kl = 0.0
        for p, ref in zip(pairs, oracle):
            k, v = droidspeak_kv(p, s, width)
            with torch.inference_mode():
                cache = runtime.build_cache(p.consumer.model, k, v)
                t = k.shape[1]
                logits = p.consumer.model(input_ids=torch.tensor([p.ids[t:]]),
                                          position_ids=torch.arange(t, len(p.ids))[None],
                                          past_key_values=cache).logits[0, -1]
            kl += quality.kl_divergence(ref, logits)
        scores.append((s, kl / len(pairs)))
    scores.sort(key=lambda x: x[1])
    return scores[0][0], scores
