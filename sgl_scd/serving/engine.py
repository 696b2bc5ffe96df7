"""Cross-model prefix reuse in the reference runtime: one producer, N consumers, one code set.

  producer request:  prefill -> encode codes of every full page -> publish -> decode its answer
  consumer request:  fetch the longest valid leading run of pages the store holds (reuse.Consumer:
                     last-token rule, calibration bound) -> rebuild its own K/V -> prefill only
                     the uncovered suffix -> decode; the gate may drop a near-tie rebuild.

Any miss shrinks the reused prefix, down to a plain prefill; it is counted, never raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sgl_scd.codec.manifest import Adapter, Encoder
from sgl_scd.hf import runtime
from sgl_scd.hf.models import LoadedModel
from sgl_scd.hf.scd import check_models, folded
from sgl_scd.reuse import Consumer, Publisher, check_min_margin
from sgl_scd.store.client import PrefixStore


@dataclass
class RequestResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens rebuilt from codes (0 on a full miss)
    published_pages: int = 0
    miss_cause: str | None = None  # why fewer pages than possible were reused
    timings: dict | None = None


@dataclass
class ServedConsumer:
    model: LoadedModel
    adapter: Adapter
    reuse: Consumer
    min_margin: float


class ReuseEngine:
    """One producer and its consumers sharing one encoder's codes through a PrefixStore (not thread-safe)."""

    def __init__(self, producer: LoadedModel, encoder: Encoder, store: PrefixStore,
                 consumers: dict[str, tuple[LoadedModel, Adapter]], *, max_new_tokens: int = 16,
                 min_margin: float | None = None):
        self.producer, self.encoder, self.store = producer, encoder, store
        encoder.manifest.producer.check("producer", producer.identity())
        self.publisher = Publisher(encoder, store)
        self.page_size = encoder.page_size
        self.max_new_tokens = max_new_tokens
        if min_margin is not None:
            check_min_margin(min_margin)  # fail at construction, not on the first request
        self.consumers: dict[str, ServedConsumer] = {}
        for name, (model, adapter) in consumers.items():
            check_models(adapter, producer, model)
            if adapter.encoder.revision != encoder.revision:
                raise ValueError(f"consumer {name}: adapter calibrated against encoder {adapter.encoder.revision[:12]}, "
                                 f"the engine publishes {encoder.revision[:12]}")
            margin = adapter.manifest.min_margin if min_margin is None else min_margin
            self.consumers[name] = ServedConsumer(model, adapter, Consumer(adapter, store, label=name), margin)

    @torch.inference_mode()
    def serve_producer(self, ids: list[int]) -> RequestResult:
        """The producer answers its own request and publishes codes of the prompt's full pages."""
        t0 = time.perf_counter()
        cap = runtime.capture_prefill(self.producer.model, ids, hidden=bool(self.encoder.codec.patch_layers))
        t1 = time.perf_counter()
        published = self.publisher.publish(ids, cap.states(self.encoder.codec.patch_layers))
        encode_s = time.perf_counter() - t1
        out = runtime.continue_from_kv(self.producer.model, self.producer.tokenizer, ids,
                                       cap.k[:, :-1], cap.v[:, :-1], max_new_tokens=self.max_new_tokens)
        return RequestResult(out.text, out.tokens, len(ids), 0, published_pages=published,
                             timings={"total_s": time.perf_counter() - t0, "publish_s": encode_s})

    @torch.inference_mode()
    def serve_consumer(self, name: str, ids: list[int]) -> RequestResult:
        """A consumer answers, rebuilding as many leading pages from codes as the store holds."""
        if name not in self.consumers:
            raise KeyError(f"consumer {name!r} is not served; choose one of {sorted(self.consumers)}")
        c = self.consumers[name]
        t0 = time.perf_counter()
        fetched = c.reuse.fetch(ids)
        k = v = None
        rebuild_s = 0.0
        if fetched.pages:
            t1 = time.perf_counter()
            k, v = folded(c.adapter, c.model.model).rebuild(fetched.codes)
            rebuild_s = time.perf_counter() - t1
        out = runtime.continue_from_kv(c.model.model, c.model.tokenizer, ids, k, v,
                                       max_new_tokens=self.max_new_tokens, min_margin=c.min_margin)
        cause = fetched.cause
        if out.fell_back:
            c.reuse.record_gate(fetched.pages)
            k, cause = None, "low_margin"
        reused = 0 if k is None else k.shape[1]
        return RequestResult(out.text, out.tokens, len(ids), reused, miss_cause=cause,
                             timings={"total_s": time.perf_counter() - t0, "rebuild_s": rebuild_s,
                                      "forward_s": out.forward_s, "payload_bytes": fetched.payload_bytes})
