"""Evaluate KV-reuse methods for one producer -> consumer pair against the consumer's oracle.

A method is a function (PairItem) -> Continuation: given one prompt (and the producer's
prefill capture, computed once per item and shared), it produces the consumer's first-token
logits and greedy answer. Built-ins: oracle, producer, raw_kv. The codec adds its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from tqdm import tqdm

from sgl_scd.demo.data import QAItem, prompt_ids
from sgl_scd.evaluation.quality import MethodScore, answer_kl
from sgl_scd.hf import runtime
from sgl_scd.hf.models import LoadedModel


@dataclass
class PairItem:
    producer: LoadedModel
    consumer: LoadedModel
    item: QAItem
    ids: list[int]
    max_new_tokens: int = 16
    reuse_tokens: int | None = None  # the leading tokens methods may reuse (default: all but the last)

    def __post_init__(self):
        if self.reuse_tokens is not None and not 0 < self.reuse_tokens < len(self.ids):
            raise ValueError(f"reuse_tokens must lie in 1..{len(self.ids) - 1}, got {self.reuse_tokens}")

    @cached_property
    def producer_capture(self) -> runtime.PrefillCapture:
        """The producer's prefill of the tokens that are shipped: all prompt tokens but the last, or
        the first reuse_tokens (a shared prefix: causal, so the same K/V whatever followed it)."""
        n = self.reuse_tokens or len(self.ids) - 1
        return runtime.capture_prefill(self.producer.model, self.ids[:n], hidden=True, residual=True)

    def continue_consumer(self, k=None, v=None, min_margin: float = 0.0) -> runtime.Continuation:
        return runtime.continue_from_kv(self.consumer.model, self.consumer.tokenizer, self.ids, k, v,
                                        max_new_tokens=self.max_new_tokens, min_margin=min_margin)


Method = Callable[[PairItem], runtime.Continuation]


def oracle(p: PairItem) -> runtime.Continuation:
    return p.continue_consumer()


def producer(p: PairItem) -> runtime.Continuation:
    cap = p.producer_capture  # the producer continues from its own (exact) cache
    return runtime.continue_from_kv(p.producer.model, p.producer.tokenizer, p.ids, cap.k, cap.v,
                                    max_new_tokens=p.max_new_tokens)


def raw_kv(p: PairItem, k: torch.Tensor | None = None) -> runtime.Continuation:
    """The consumer continues from the producer's KV as shipped (bf16 K + V); k: other keys in
    place of the producer's (baselines.rerotated_kv)."""
    cap = p.producer_capture
    out = p.continue_consumer(cap.k if k is None else k, cap.v)
    out.timings.update(rebuild_s=0.0, tokens=cap.num_tokens, payload_bytes=cap.k.numel() * 2 * 2)
    return out


BASELINES: dict[str, Method] = {"oracle": oracle, "producer": producer, "raw_kv": raw_kv}


def check_compatible(producer_model: LoadedModel, consumer_model: LoadedModel) -> None:
    """Same topology and tokenizer, or a ValueError naming what differs."""
    a, b = producer_model.config, consumer_model.config
    for name in ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"producer and consumer differ in {name}: {getattr(a, name)} vs {getattr(b, name)}")
    if producer_model.tokenizer.get_vocab() != consumer_model.tokenizer.get_vocab():
        raise ValueError("producer and consumer tokenizers differ")


@torch.inference_mode()
def evaluate(producer_model: LoadedModel, consumer_model: LoadedModel, items: list[QAItem],
             methods: dict[str, Method], *, max_new_tokens: int = 16, desc: str = "eval",
             on_item: Callable[[PairItem, dict], None] | None = None,
             reuse_tokens: Callable[[QAItem, list[int]], int] | None = None) -> list[dict]:
    """Run every method on every item, in order, the oracle first; one summary dict per method
    (the oracle always included: a given "oracle" method, e.g. one that records its outputs, in
    place of the default). reuse_tokens(item, ids): how many leading prompt tokens the methods
    reuse (default all but the last)."""
    check_compatible(producer_model, consumer_model)
    methods = {"oracle": methods.get("oracle", oracle), **{k: m for k, m in methods.items() if k != "oracle"}}
    scores = {name: MethodScore(name) for name in methods}
    for item in tqdm(items, desc=desc, file=sys.stderr):
        ids = prompt_ids(consumer_model.tokenizer, item)
        p = PairItem(producer_model, consumer_model, item, ids, max_new_tokens,
                     reuse_tokens(item, ids) if reuse_tokens else None)
        outs = {name: fn(p) for name, fn in methods.items()}
        ref = outs["oracle"]
        for name, out in outs.items():
            scores[name].add(out.text, out.first_logits, item.answer, ref.text, ref.first_logits,
                             answer_kl(out.tokens, out.later_logits, ref.tokens, ref.later_logits))
        if on_item is not None:
            on_item(p, outs)
    return [s.summary() for s in scores.values()]
