"""The server's Prometheus counters, in the store's registry so /metrics serves one registry.

Names follow SGLang's (`sglang:prompt_tokens_total`) and LMCache's (`lmcache:...`) manner; rates
are PromQL's job (rate(sgl_scd:hit_tokens_total[5m]) / rate(sgl_scd:lookup_tokens_total[5m])).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from sgl_scd.store.metrics import STORE_REGISTRY, ProcessDefault

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics(ProcessDefault):
    def __init__(self, registry=STORE_REGISTRY):
        r = registry
        self.requests = Counter("sgl_scd:requests", "Requests finished, by model and outcome",
                                ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("sgl_scd:prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generation_tokens = Counter("sgl_scd:generation_tokens", "Generated tokens", ["model"], registry=r)
        self.lookup_tokens = Counter("sgl_scd:lookup_tokens", "Prompt tokens an adapter asked the store for",
                                     ["adapter"], registry=r)
        self.hit_tokens = Counter("sgl_scd:hit_tokens", "Tokens the store returned as valid pages",
                                  ["adapter"], registry=r)
        self.rebuilt_tokens = Counter("sgl_scd:rebuilt_tokens", "Prompt tokens rebuilt from codes and used",
                                      ["adapter"], registry=r)
        self.misses = Counter("sgl_scd:miss_requests", "Adapter requests that reused fewer pages than the "
                              "prompt allowed, by cause", ["adapter", "cause"], registry=r)
        self.rebuild_seconds = Histogram("sgl_scd:rebuild_seconds", "Rebuilding an adapter's K/V from codes",
                                         ["adapter"], buckets=_SECONDS, registry=r)
        self.ttft = Histogram("sgl_scd:time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=_SECONDS, registry=r)
        self.e2e = Histogram("sgl_scd:e2e_request_latency_seconds", "Arrival to last token", ["model"],
                             buckets=_SECONDS, registry=r)
        self.published_pages = Counter("sgl_scd:published_pages", "Code pages the producer published",
                                       registry=r)
        self.published_bytes = Counter("sgl_scd:published_bytes", "Code bytes the producer published",
                                       registry=r)
        self.publish_jobs = Counter("sgl_scd:publish_jobs", "Producer prompts handed to the publisher, by "
                                    "outcome (ok, queue_full, or the error's type)", ["outcome"], registry=r)
        self.running = Gauge("sgl_scd:num_running_reqs", "Requests decoding", registry=r)
        self.waiting = Gauge("sgl_scd:num_queue_reqs", "Requests waiting for the model thread", registry=r)

    def published(self, pages: int, nbytes: int, error: str | None) -> None:
        self.published_pages.inc(pages)
        self.published_bytes.inc(nbytes)
        self.publish_jobs.labels(error or "ok").inc()
