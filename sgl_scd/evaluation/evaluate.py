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

    @cached_property
    def producer_capture(self) -> runtime.PrefillCapture:
        """The producer's prefill of all prompt tokens but the last (the part that is shipped)."""
        return runtime.capture_prefill(self.producer.model, self.ids[:-1], hidden=True, residual=True)

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


def raw_kv(p: PairItem) -> runtime.Continuation:
    cap = p.producer_capture
    return p.continue_consumer(cap.k, cap.v)


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
             on_item: Callable[[PairItem, dict], None] | None = None) -> list[dict]:
    """Run every method on every item; one summary dict per method (oracle always included)."""
    check_compatible(producer_model, consumer_model)
    methods = {"oracle": oracle, **{k: m for k, m in methods.items() if k != "oracle"}}
    scores = {name: MethodScore(name) for name in methods}
    for item in tqdm(items, desc=desc, file=sys.stderr):
        p = PairItem(producer_model, consumer_model, item, prompt_ids(consumer_model.tokenizer, item),
                     max_new_tokens)
        outs = {name: fn(p) for name, fn in methods.items()}
        ref = outs["oracle"]
        for name, out in outs.items():
            scores[name].add(out.text, out.first_logits, item.answer, ref.text, ref.first_logits,
                             answer_kl(out.tokens, out.later_logits, ref.tokens, ref.later_logits))
        if on_item is not None:
            on_item(p, outs)
    return [s.summary() for s in scores.values()]
