"""The reuse protocol, owned by no engine: what a producer publishes and what a consumer may
promise, fetch and decode for a request. The HF engine (sgl_scd.serving) is one user of it; an
SGLang cache linker is another.

  policy.py    the rules: last-token rule, calibration bound, the near-tie gate and its ledger, miss causes
  protocol.py  store identity of an encoder, Publisher (producer side), Consumer (adapter side)
"""

from sgl_scd.reuse.policy import (
           MISS_CAUSES,
           GateLedger,
           check_min_margin,
           top2_margin,
           usable_pages,
)
from sgl_scd.reuse.protocol import Consumer, Fetched, Publisher, store_identity

__all__ = ["MISS_CAUSES", "Consumer", "Fetched", "GateLedger", "Publisher", "check_min_margin", "store_identity",
           "top2_margin", "usable_pages"]
