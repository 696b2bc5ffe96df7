"""Serving rules shared by every engine that reuses SCD codes.

- Last-token rule: the page holding a prompt's last token is never reused (the engine needs that
  token's logits; SGLang caps its matches at input_len - 1 the same way).
- Calibration bound: decoders are trusted only on positions calibration saw; longer prefixes
  reuse that much and prefill the rest.
- Gate: a rebuilt cache whose first answer token is a near-tie (top-1 minus top-2 probability
  below min_margin) is dropped for a prefill; small errors flip such answers.
- Gate ledger: where the gate drops so many rebuilds that trying costs more than a prefill, the
  adapter prefills at once (GateLedger), probing now and then.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch

# Why fewer pages were reused than the prompt allowed (per page, or per request for the gate).
MISS_CAUSES = (
    "store_miss",  # absent, expired, or the store down / slow / refusing (the store counts its own cause)
    "wire",  # the store served a page the codec refused (digest, index, length, checksum)
    "beyond_calibration",  # past the positions the adapter was calibrated on
    "low_margin",  # the gate dropped the rebuilt cache
    "gate_skip",  # the gate drops so many rebuilds here that the request prefilled at once (GateLedger)
    "disabled",  # the adapter's kill switch is off
    "no_adapter",  # the consumer has no SCD artifacts
)


def usable_pages(num_tokens: int, page_size: int, max_tokens: int | None = None, first_page: int = 0
                 ) -> tuple[int, str | None]:
    """(pages after first_page that may be reused, "beyond_calibration" if the bound cut them)."""
    if num_tokens < 1:
        raise ValueError(f"a prompt has at least one token, got {num_tokens}")
    pages = max(0, (num_tokens - 1) // page_size - first_page)  # never the last token's page
    if max_tokens is not None and first_page + pages > max_tokens // page_size:
        return max(0, max_tokens // page_size - first_page), "beyond_calibration"
    return pages, None


def top2_margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 probability of a logit vector [V]: how near a tie the choice is."""
    top = torch.softmax(logits.float(), -1).topk(2).values
    return float(top[0] - top[1])


def check_min_margin(min_margin: float) -> float:
    """min_margin if it is a probability gap in [0, 1]; ValueError naming the value otherwise."""
    if not isinstance(min_margin, (int, float)) or not 0.0 <= min_margin <= 1.0:
        raise ValueError(f"min_margin is a probability gap in [0, 1], got {min_margin!r}")
    return float(min_margin)


class GateLedger:
    """Whether a gated adapter's next reuse attempt pays, from its recent attempts.

    A rebuild the gate drops costs its fetch, rebuild and suffix forward on top of the prefill
    that replaces it. Per prompt-length class (powers of two), over the last `window` attempts
    (once at least min_seen are in): f = the share the gate dropped, c = attempt seconds /
    prefill seconds of the dropped ones (both measured on the same request). Trying costs c + f
    prefills in expectation; while that exceeds one prefill (f > 1 - c) requests prefill at once,
    except every probe_every-th, which tries so that f follows the workload. A wrong skip costs
    time, never an answer: a skipped request is the adapter's own prefill. Not thread-safe (one
    per engine, as the engine)."""

    def __init__(self, window: int = 16, min_seen: int = 4, probe_every: int = 8):
        if not 1 <= min_seen <= window or probe_every < 1:
            raise ValueError(f"need 1 <= min_seen <= window and probe_every >= 1, got window={window}, "
                             f"min_seen={min_seen}, probe_every={probe_every}")
        self.window, self.min_seen, self.probe_every = window, min_seen, probe_every
        self._attempts: dict[int, deque[float | None]] = {}  # per class: c of a drop, None if kept
        self._skips: dict[int, int] = {}

    @staticmethod
    def length_class(num_tokens: int) -> int:
        return max(1, num_tokens).bit_length()

    def expected_cost(self, num_tokens: int) -> float | None:
        """c + f in prefills for a prompt of this length, None until min_seen attempts are in."""
        seen = self._attempts.get(self.length_class(num_tokens), ())
        if len(seen) < self.min_seen:
            return None
        drops = [c for c in seen if c is not None]
        return (statistics.mean(drops) if drops else 0.0) + len(drops) / len(seen)

    def should_try(self, num_tokens: int) -> bool:
        cost = self.expected_cost(num_tokens)
        if cost is None or cost <= 1.0:
            return True
        cls = self.length_class(num_tokens)
        self._skips[cls] = self._skips.get(cls, 0) + 1
        return self._skips[cls] % self.probe_every == 0  # a probe

    def record(self, num_tokens: int, dropped: bool, attempt_s: float = 0.0, prefill_s: float = 0.0) -> None:
        """One attempt that rebuilt pages: dropped by the gate (with its attempt and prefill seconds) or kept."""
        seen = self._attempts.setdefault(self.length_class(num_tokens), deque(maxlen=self.window))
        if not dropped:
            seen.append(None)
        else:
            seen.append(attempt_s / prefill_s if prefill_s > 0 else 0.0)
