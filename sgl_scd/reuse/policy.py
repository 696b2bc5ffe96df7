"""Serving rules shared by every engine that reuses SCD codes.

- Last-token rule: the page holding a prompt's last token is never reused (the engine needs that
  token's logits; SGLang caps its matches at input_len - 1 the same way).
- Calibration bound: decoders are trusted only on positions calibration saw; longer prefixes
  reuse that much and prefill the rest.
- Gate: a rebuilt cache whose first answer token is a near-tie (top-1 minus top-2 probability
  below min_margin) is dropped for a prefill; small errors flip such answers.
"""

from __future__ import annotations

import torch

# Why fewer pages were reused than the prompt allowed (per page, or per request for the gate).
MISS_CAUSES = (
    "store_miss",  # absent, expired, or the store down / slow / refusing (the store counts its own cause)
    "wire",  # the store served a page the codec refused (digest, index, length, checksum)
    "beyond_calibration",  # past the positions the adapter was calibrated on
    "low_margin",  # the gate dropped the rebuilt cache
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
