"""The linker's Prometheus counters, named in SGLang's / LMCache's manner (sgl_scd:...). They live
in prometheus_client's default registry of the scheduler process, which SGLang's --enable-metrics
exports (multiprocess mode); rates are PromQL's job."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

from sgl_scd.store.metrics import ProcessDefault

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class LinkerMetrics(ProcessDefault):

    def __init__(self, registry=REGISTRY):
        r, a = registry, ["adapter"]
        self.lookup_tokens = Counter("sgl_scd:linker_lookup_tokens", "Tokens after the device prefix an adapter "
                                     "request asked for", a, registry=r)
        self.hit_tokens = Counter("sgl_scd:linker_hit_tokens", "Tokens promised from decoded codes", a, registry=r)
        self.rebuilt_tokens = Counter("sgl_scd:linker_rebuilt_tokens", "Tokens rebuilt into request slots", a,
                                      registry=r)
        self.rebuild_seconds = Histogram("sgl_scd:linker_rebuild_seconds", "One batch's layer-wise rebuild",
                                         buckets=_SECONDS, registry=r)
        self.misses = Counter("sgl_scd:linker_miss_pages", "Pages not promised, by cause", [*a, "cause"],
                              registry=r)
        self.published_pages = Counter("sgl_scd:linker_published_pages", "Base pages published", registry=r)
        self.published_bytes = Counter("sgl_scd:linker_published_bytes", "Code bytes published", registry=r)
