"""Cross-model prefix reuse in the reference runtime: one producer, N consumers, one code set.

  producer request:  prefill -> hand its states to the publisher (background worker, or inline)
                     -> decode its answer
  consumer request:  fetch the longest valid leading run of pages the store holds (reuse.Consumer:
                     last-token rule, calibration bound) -> rebuild its own K/V -> prefill only
                     the uncovered suffix -> decode; the gate may drop a near-tie rebuild,
                     and where it drops so many that trying costs more than a prefill, its
                     ledger prefills at once (reuse.GateLedger).

Any miss shrinks the reused prefix, down to a plain prefill; it is counted, never raised.
A request is a generator of answer tokens (`steps`), so a scheduler can interleave many; the
engine itself is not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sgl_scd.codec.manifest import Adapter, Encoder
from sgl_scd.hf import runtime
from sgl_scd.hf.models import LoadedModel
from sgl_scd.hf.scd import check_models, folded
from sgl_scd.reuse import Consumer, GateLedger, Publisher, check_min_margin
from sgl_scd.serving.publish_worker import PublishWorker
from sgl_scd.store.client import PrefixStore

PRODUCER = "producer"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    """One request's state; the prompt fields are set once its prefill ran (before the first token)."""

    model: str  # PRODUCER or a consumer name
    ids: list[int]
    sampling: Sampling
    reuse: bool = True
    lookup_tokens: int = 0  # prompt tokens the rules let the consumer ask the store for
    hit_tokens: int = 0  # of those, tokens the store returned as valid pages
    cached_tokens: int = 0  # prompt tokens rebuilt from codes and used (0 on a miss)
    miss_cause: str | None = None  # why fewer pages than possible were reused
    queued_for_publish: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length"
    timings: dict = field(default_factory=dict)


@dataclass
class RequestResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens rebuilt from codes (0 on a full miss)
    published_pages: int = 0
    miss_cause: str | None = None
    timings: dict | None = None


@dataclass
class ServedConsumer:
    model: LoadedModel
    adapter: Adapter
    reuse: Consumer
    min_margin: float
    ledger: GateLedger = field(default_factory=GateLedger)  # used when min_margin > 0


class ReuseEngine:
    """One producer and its consumers sharing one encoder's codes through a PrefixStore."""

    def __init__(self, producer: LoadedModel, encoder: Encoder, store: PrefixStore,
                 consumers: dict[str, tuple[LoadedModel, Adapter]], *, max_new_tokens: int = 16,
                 min_margin: float | None = None, background_publish: bool = False, publish_queue: int = 64,
                 on_published=None):
        self.producer, self.encoder, self.store = producer, encoder, store
        encoder.manifest.producer.check("producer", producer.identity())
        self.publisher = Publisher(encoder, store)
        self.worker = PublishWorker(self.publisher, publish_queue, on_published) if background_publish else None
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
        self._stop = runtime.stop_ids(producer.tokenizer)

    def model(self, name: str) -> LoadedModel:
        if name == PRODUCER:
            return self.producer
        if name not in self.consumers:
            raise KeyError(f"consumer {name!r} is not served; choose one of {sorted(self.consumers)}")
        return self.consumers[name].model

    def steps(self, gen: Generation) -> Iterator[int]:
        """The request's answer tokens, one per next(): its prefill runs on the first."""
        model = self.model(gen.model).model
        t0 = time.perf_counter()
        pre = self._prefill_producer(gen) if gen.model == PRODUCER else self._prefill_consumer(gen)
        gen.timings["prefill_s"] = time.perf_counter() - t0
        choose = _sampler(gen.sampling)
        with torch.inference_mode():
            for tok in runtime.decode_steps(model, pre, choose):
                if tok in self._stop:
                    gen.finish_reason = "stop"
                    return
                gen.tokens.append(tok)
                yield tok
                if len(gen.tokens) >= gen.sampling.max_tokens:
                    gen.finish_reason = "length"
                    return

    def _prefill_producer(self, gen: Generation) -> runtime.Prefilled:
        layers = self.encoder.codec.patch_layers
        t0 = time.perf_counter()
        cap = runtime.capture_prefill(self.producer.model, gen.ids, hidden=bool(layers), keep_cache=True)
        forward_s = time.perf_counter() - t0
        states = cap.states(layers)
        t0 = time.perf_counter()
        if self.worker is not None:
            gen.queued_for_publish = self.worker.submit(gen.ids, states)
        else:
            gen.timings["published_pages"] = self.publisher.publish(gen.ids, states)
        gen.timings["publish_s"] = time.perf_counter() - t0
        return runtime.Prefilled(cap.cache, cap.last_logits, len(gen.ids), forward_s)  # decode goes on from it

    def _prefill_consumer(self, gen: Generation) -> runtime.Prefilled:
        c = self.consumers[gen.model]
        if not gen.reuse:  # the caller asked for the consumer's own prefill
            return runtime.prefill_on_kv(c.model.model, gen.ids)
        gated = c.min_margin > 0
        if gated and not c.ledger.should_try(len(gen.ids)):  # trying would cost more than it saves
            c.reuse.record_gate(c.reuse.usable(len(gen.ids))[0], "gate_skip")
            gen.miss_cause = "gate_skip"
            pre = runtime.prefill_on_kv(c.model.model, gen.ids)
            gen.timings["forward_s"] = pre.forward_s
            return pre
        t0 = time.perf_counter()
        fetched = c.reuse.fetch(gen.ids)
        k = v = None
        if fetched.pages:
            t1 = time.perf_counter()
            with torch.inference_mode():
                k, v = folded(c.adapter, c.model.model).rebuild(fetched.codes)
            gen.timings["rebuild_s"] = time.perf_counter() - t1
        gen.timings["payload_bytes"] = fetched.payload_bytes
        gen.lookup_tokens, gen.hit_tokens = fetched.usable * self.page_size, fetched.pages * self.page_size
        pre = runtime.prefill_on_kv(c.model.model, gen.ids, k, v, min_margin=c.min_margin)
        gen.miss_cause = fetched.cause
        if gated and fetched.pages:
            c.ledger.record(len(gen.ids), pre.fell_back, time.perf_counter() - t0 - pre.fallback_s, pre.fallback_s)
        if pre.fell_back:
            c.reuse.record_gate(fetched.pages)
            k, gen.miss_cause = None, "low_margin"
        gen.cached_tokens = 0 if k is None else k.shape[1]
        gen.timings["forward_s"] = pre.forward_s
        return pre

    def run(self, gen: Generation) -> Generation:
        """All of a request's tokens at once."""
        t0 = time.perf_counter()
        for _ in self.steps(gen):
            pass
        gen.timings["total_s"] = time.perf_counter() - t0
        return gen

    def text(self, gen: Generation) -> str:
        return self.producer.tokenizer.decode(gen.tokens, skip_special_tokens=True)

    def serve_producer(self, ids: list[int]) -> RequestResult:
        """The producer answers its own request and publishes codes of the prompt's full pages."""
        gen = self.run(Generation(PRODUCER, ids, Sampling(self.max_new_tokens)))
        return RequestResult(self.text(gen), gen.tokens, len(ids), 0,
                             published_pages=gen.timings.get("published_pages", 0), timings=gen.timings)

    def serve_consumer(self, name: str, ids: list[int]) -> RequestResult:
        """A consumer answers, rebuilding as many leading pages from codes as the store holds."""
        self.model(name)
        gen = self.run(Generation(name, ids, Sampling(self.max_new_tokens)))
        return RequestResult(self.text(gen), gen.tokens, len(ids), gen.cached_tokens, miss_cause=gen.miss_cause,
                             timings=gen.timings)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _sampler(s: Sampling):
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling, seeded per request."""
    if s.temperature == 0:
        return lambda logits: int(logits.argmax())
    g = torch.Generator()
    g.manual_seed(s.seed if s.seed is not None else torch.seed())

    def choose(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / s.temperature, -1)
        if s.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            keep = p.cumsum(-1) - p < s.top_p  # the smallest head whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=g))

    return choose
