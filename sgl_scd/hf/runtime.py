"""Reference runtime on transformers: capture a prefill's per-layer state, or continue from
per-layer K/V built anywhere else.

Layouts (one prompt, no batch dim):
  k, v   [L, T, H_kv, D]  keys after RoPE (what SGLang's KV pool holds) and values
  h_in   [L, T, hidden]   input_layernorm output of every layer (what feeds q/k/v projections)

capture_prefill() runs a plain forward; continue_from_kv() installs K/V for the first T prompt
tokens into a fresh cache, runs the remaining tokens (at least the last one) and decodes
greedily. continue_from_kv(k=None) is an ordinary prefill, the oracle; with min_margin it is
the gated serving path: a rebuilt cache whose first-token distribution is a near-tie is
dropped and the prompt prefilled instead. Servers use its two halves: prefill_on_kv() (the
cache and the first answer token's logits) and decode_steps() (one token per next()).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from sgl_scd.codec import rope
from sgl_scd.codec.states import ConsumerProjections, KVProjection, ProducerStates
from sgl_scd.reuse.policy import check_min_margin, top2_margin


@dataclass
class PrefillCapture:
    k: torch.Tensor  # [L, T, H_kv, D] after RoPE
    v: torch.Tensor  # [L, T, H_kv, D]
    h_in: torch.Tensor | None  # [L, T, hidden] or None when not captured
    last_logits: torch.Tensor  # [V] next-token logits after the whole input
    theta: float  # the RoPE base the keys were rotated with
    sel_logits: torch.Tensor | None = None  # [P, V] logits at the positions asked for (logits_at)
    resid: torch.Tensor | None = None  # [L, T, hidden] residual stream entering each layer, if asked
    cache: DynamicCache | None = None  # the prefill's own cache, if asked (keep_cache): decode goes on from it

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def k_derotated(self) -> torch.Tensor:
        """Keys with RoPE removed, [L, T, H_kv, D]."""
        return rope.derotate(self.k, self.theta)

    def states(self, h_layers=(), tokens: int | None = None) -> ProducerStates:
        """The codec's input: K, V of every layer and h at h_layers, for the first `tokens` tokens."""
        t = self.num_tokens if tokens is None else tokens
        if h_layers and self.h_in is None:
            raise ValueError("the encoder needs normalized inputs: capture with hidden=True")
        return ProducerStates(self.k[:, :t], self.v[:, :t], {layer: self.h_in[layer, :t] for layer in h_layers},
                              self.theta)


@dataclass
class Continuation:
    first_logits: torch.Tensor  # [V] distribution for the first answer token
    tokens: list[int]  # greedy answer tokens (stop token excluded)
    text: str
    forward_s: float  # time of the suffix forward that produced first_logits (+ the fallback prefill)
    timings: dict = field(default_factory=dict)
    fell_back: bool = False  # the given K/V were dropped for a prefill (min_margin)
    later_logits: list[torch.Tensor] = field(default_factory=list)  # [V] after each answer token fed back


def _layers(model):
    return model.model.layers


def attention(model, layer: int):
    """One decoder layer's self-attention module (q/k/v/o projections, LoRA merged)."""
    return _layers(model)[layer].self_attn


def num_layers(model) -> int:
    return len(_layers(model))


@torch.inference_mode()
def capture_prefill(model, ids: list[int], *, hidden: bool = True, logits_at: list[int] | None = None,
                    residual: bool = False, keep_cache: bool = False) -> PrefillCapture:
    """Run a full prefill of ids and return per-layer K (post-RoPE), V and normalized inputs
    (optionally the logits at positions `logits_at`, the residual stream and the cache itself)."""
    if len(ids) == 0:
        raise ValueError("capture_prefill needs at least one token id")
    h_in: list[torch.Tensor] = []
    hooks = []
    if hidden:
        for layer in _layers(model):
            hooks.append(
                layer.input_layernorm.register_forward_hook(lambda _m, _i, out: h_in.append(out[0]))
            )
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                    output_hidden_states=residual)
    finally:
        for h in hooks:
            h.remove()
    k, v = _cache_kv(cache)
    return PrefillCapture(
        k=k, v=v, h_in=torch.stack(h_in) if hidden else None,
        last_logits=out.logits[0, -1].float(), theta=rope.rope_theta(model.config),
        sel_logits=out.logits[0, logits_at].float().clone() if logits_at else None,
        resid=torch.stack(out.hidden_states[:-1])[:, 0] if residual else None,
        cache=cache if keep_cache else None,
    )


def _cache_kv(cache: DynamicCache, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [L, T - start, H_kv, D] held by a one-prompt cache, from token `start` on."""
    k = torch.stack([layer.keys[0, :, start:].transpose(0, 1) for layer in cache.layers])
    v = torch.stack([layer.values[0, :, start:].transpose(0, 1) for layer in cache.layers])
    return k, v


@torch.inference_mode()
def extend_kv(model, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K (after RoPE) and V [L, len(ids) - T, H_kv, D] of the tokens ids[T:] run on top of k, v
    covering the first T: what a prefill of ids would hold for them, without redoing the first T."""
    cache, _, _ = _extend(model, ids, k, v)
    return _cache_kv(cache, k.shape[1])


def build_cache(model, k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    """A transformers cache holding k, v [L, T, H_kv, D] (keys already rotated for this model)."""
    n = num_layers(model)
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != n:
        raise ValueError(
            f"expected k and v of shape [L={n}, T, H_kv, D], got k {tuple(k.shape)} v {tuple(v.shape)}"
        )
    cache = DynamicCache(config=model.config)
    dtype = model.dtype
    for layer in range(n):
        cache.update(
            k[layer].transpose(0, 1)[None].to(dtype).contiguous(),  # [1, H, T, D]
            v[layer].transpose(0, 1)[None].to(dtype).contiguous(),
            layer,
        )
    return cache


@torch.inference_mode()
def continue_from_kv(
    model,
    tokenizer,
    ids: list[int],
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 16,
    min_margin: float = 0.0,
) -> Continuation:
    """Continue a prompt whose first T tokens are covered by k/v [L, T, H_kv, D] (T < len(ids)).

    Runs ids[T:] through the model on top of that cache, then decodes greedily until an end
    token or max_new_tokens. With k=None this is a plain prefill (the oracle). With
    min_margin > 0, when the first answer token's top-1 minus top-2 probability on the given
    K/V is below min_margin, they are dropped and the prompt is prefilled (fell_back=True;
    forward_s then counts both forwards).
    """
    pre = prefill_on_kv(model, ids, k, v, min_margin=min_margin)
    tokens, later_logits = _greedy(model, tokenizer, pre.cache, pre.first_logits, len(ids), max_new_tokens)
    return Continuation(first_logits=pre.first_logits, tokens=tokens, forward_s=pre.forward_s,
                        fell_back=pre.fell_back, text=tokenizer.decode(tokens, skip_special_tokens=True),
                        later_logits=later_logits)


@dataclass
class Prefilled:
    """A prompt in a cache, ready to decode: the first answer token's logits."""

    cache: DynamicCache
    first_logits: torch.Tensor  # [V]
    num_tokens: int  # prompt tokens the cache holds
    forward_s: float  # the suffix forward (+ the fallback prefill)
    fell_back: bool = False  # the given K/V were dropped for a prefill (min_margin)
    fallback_s: float = 0.0  # of forward_s, the fallback prefill's seconds


@torch.inference_mode()
def prefill_on_kv(model, ids: list[int], k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                  min_margin: float = 0.0) -> Prefilled:
    """The prompt's cache with its first T tokens from k/v [L, T, H_kv, D] (T < len(ids)) and the
    rest run by the model; k=None is a plain prefill. With min_margin > 0 a near-tie first token on
    the given K/V drops them for a prefill (fell_back)."""
    covered = 0 if k is None else k.shape[1]
    if covered >= len(ids):
        raise ValueError(
            f"K/V cover {covered} tokens but the prompt has {len(ids)}: at least the last prompt "
            "token must be run to get logits"
        )
    check_min_margin(min_margin)
    cache, first_logits, forward_s = _extend(model, ids, k, v)
    fell_back = k is not None and min_margin > 0 and top2_margin(first_logits) < min_margin
    prefill_s = 0.0
    if fell_back:
        cache, first_logits, prefill_s = _extend(model, ids, None, None)
    return Prefilled(cache, first_logits, len(ids), forward_s + prefill_s, fell_back, prefill_s)


@torch.inference_mode()
def decode_steps(model, pre: Prefilled, choose=lambda logits: int(logits.argmax())):
    """Answer tokens one at a time, chosen by `choose(logits)` (greedy by default), without end:
    the caller stops (stop tokens, length). Each token costs one forward, run when the next is asked."""
    logits, pos = pre.first_logits, pre.num_tokens
    while True:
        nxt = choose(logits)
        yield nxt
        out = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[pos]]),
                    past_key_values=pre.cache, use_cache=True)
        logits = out.logits[0, -1].float()
        pos += 1


def _extend(model, ids, k, v) -> tuple[DynamicCache, torch.Tensor, float]:
    """Run the prompt tokens k/v do not cover on top of them: (cache, first-token logits, seconds)."""
    covered = 0 if k is None else k.shape[1]
    cache = build_cache(model, k, v) if k is not None else DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([ids[covered:]]), position_ids=torch.arange(covered, len(ids))[None],
                past_key_values=cache, use_cache=True)
    return cache, out.logits[0, -1].float(), time.perf_counter() - t0


def _greedy(model, tokenizer, cache, logits: torch.Tensor, pos: int, max_new_tokens: int
            ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy answer tokens from the first answer token's logits until a stop token, and the
    logits after each of them (what the next answer token was chosen from)."""
    stop = stop_ids(tokenizer)
    seen: list[torch.Tensor] = []  # every logits vector a token was chosen from, the first one included

    def choose(x: torch.Tensor) -> int:
        seen.append(x.float())
        return int(x.argmax())

    tokens: list[int] = []
    for tok in decode_steps(model, Prefilled(cache, logits, pos, 0.0), choose):
        if tok in stop or len(tokens) == max_new_tokens:  # asking for it ran the last token's forward
            break
        tokens.append(tok)
    return tokens, seen[1:]


class _ReplacedKV(DynamicCache):
    """A cache that hands every layer's attention the given K/V [L, B, T, H_kv, D] instead of its
    own; with a mask [B, 1, T, 1], only where the mask is set (elsewhere the model's own K/V)."""

    def __init__(self, config, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        super().__init__(config=config)
        self._k, self._v, self._mask = k, v, mask

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._k[layer_idx].transpose(1, 2), self._v[layer_idx].transpose(1, 2)  # [B, H, T, D]
        if self._mask is None:
            return k, v
        return torch.where(self._mask, k, key_states), torch.where(self._mask, v, value_states)


def logits_with_kv(model, ids: list[list[int]], k: list[torch.Tensor], v: list[torch.Tensor],
                   positions: list[list[int]], given: list[int] | None = None) -> list[torch.Tensor]:
    """Per prompt, logits [P, V] at the given positions of a forward over its ids in which every
    layer attends to the given K/V [L, T, H_kv, D] (causally) instead of the K/V it computes
    itself. Differentiable in k, v. given: per prompt, only its first given[i] tokens read the
    given K/V and the rest the model's own, as when a cached prefix is followed by a prefill.

    Each position's prediction then depends on the given K/V of the positions up to it: this
    supervises a K/V rebuild at every prompt position in one pass (used by distillation).
    Prompts run as one batch, right-padded: causal attention keeps the padding out of every real
    position. The LM head runs only at the asked positions.
    """
    for i, (x, kk) in enumerate(zip(ids, k)):
        if kk.shape[1] != len(x):
            raise ValueError(f"prompt {i}: K/V cover {kk.shape[1]} tokens, ids have {len(x)}")
    t = max(len(x) for x in ids)

    def stack(xs):  # [L, B, T, H, D], zero-padded
        return torch.stack([torch.nn.functional.pad(x, (0, 0, 0, 0, 0, t - x.shape[1])) for x in xs], 1).to(model.dtype)

    mask = None if given is None else (torch.arange(t)[None] < torch.tensor(given)[:, None])[:, None, :, None]
    cache = _ReplacedKV(model.config, stack(k), stack(v), mask)
    batch = torch.tensor([x + [0] * (t - len(x)) for x in ids])
    hidden = model.model(input_ids=batch, past_key_values=cache, use_cache=True).last_hidden_state
    return [model.lm_head(hidden[b, p]).float() for b, p in enumerate(positions)]


def stop_ids(tokenizer) -> set[int]:
    stop = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            stop.add(tid)
    return {s for s in stop if s is not None}


def projections(model, layers) -> ConsumerProjections:
    """The consumer's K/V projections at these layers, as tensors (the module parameters, LoRA merged)."""
    out = {}
    for layer in layers:
        attn = attention(model, layer)
        out[layer] = KVProjection(attn.k_proj.weight, attn.v_proj.weight, attn.k_proj.bias, attn.v_proj.bias)
    c = model.config
    return ConsumerProjections(rope.rope_theta(c), c.num_key_value_heads, c.head_dim, out)


def project_kv(model, layer: int, h_in: torch.Tensor, start: int = 0, *, grad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """K (after this model's RoPE) and V of one layer computed from its normalized input.

    h_in [T, hidden] -> k, v [T, H_kv, D]. Uses the model's own k/v projections (merged LoRA
    deltas and biases included) and its own RoPE base. grad=True keeps the autograd graph
    (for distillation through the frozen consumer).
    """
    with torch.set_grad_enabled(grad):
        return projections(model, [layer]).project(layer, h_in, start)
