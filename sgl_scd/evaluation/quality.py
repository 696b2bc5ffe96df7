"""Quality metrics against the oracle (the consumer's own prefill) and the gold answer.

Answer metrics follow SQuAD's normalization (lowercase, drop punctuation and articles, squash
whitespace). Distribution metrics compare next-token distributions of the first answer token;
kl_answer sums the KL over the answer's later tokens along the oracle's answer, on the items
whose first answer token agrees (multi-token answers such as Hi-ToM's red_container can keep
the first token and drift after it).
Noise: at n=100 the standard error of F1 is ~0.05; KL, top-1 and same-answer are the
low-variance signals, F1 differences of a few percent need n >= 500.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field

import torch

from sgl_scd.reuse.policy import top2_margin  # noqa: F401  (the gate's margin, a quality metric too)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().replace("_", " ")  # Hi-ToM locations are written green_drawer
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def kl_divergence(oracle_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p_oracle || p) in nats for two logit vectors [V]."""
    log_p = torch.log_softmax(oracle_logits.double(), -1)
    log_q = torch.log_softmax(logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))


def answer_kl(tokens: list[int], later_logits: list[torch.Tensor], oracle_tokens: list[int],
              oracle_later_logits: list[torch.Tensor]) -> float | None:
    """KL summed over an answer's later tokens (the second one on, the end of the answer
    included) along the oracle's greedy answer: step i counts while the answer so far equals the
    oracle's, so both distributions condition on the same prefix. None when the first answer
    tokens differ or an answer has no later step."""
    total, steps = 0.0, 0
    for i in range(min(len(later_logits), len(oracle_later_logits))):
        if tokens[: i + 1] != oracle_tokens[: i + 1]:  # later_logits[i] follows tokens[: i + 1]
            break
        total += kl_divergence(oracle_later_logits[i], later_logits[i])
        steps += 1
    return total if steps else None


@dataclass
class MethodScore:
    """Running per-method totals; summary() gives means over the items seen."""

    method: str
    f1: list[float] = field(default_factory=list)
    em: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    same: list[float] = field(default_factory=list)
    kl_answer: list[float] = field(default_factory=list)  # answer_kl, where it is defined

    def add(self, text: str, logits: torch.Tensor, gold: str, oracle_text: str, oracle_logits,
            kl_answer: float | None = None) -> None:
        """One item; kl_answer is answer_kl's value (None: not defined for this item)."""
        self.f1.append(token_f1(text, gold))
        self.em.append(exact_match(text, gold))
        self.kl.append(kl_divergence(oracle_logits, logits))
        self.top1.append(float(int(logits.argmax()) == int(oracle_logits.argmax())))
        self.same.append(float(normalize_answer(text) == normalize_answer(oracle_text)))
        if kl_answer is not None:
            self.kl_answer.append(kl_answer)

    def summary(self) -> dict:
        n = len(self.f1)

        def mean(xs):
            return sum(xs) / n if n else float("nan")

        f1 = mean(self.f1)
        f1_se = math.sqrt(sum((x - f1) ** 2 for x in self.f1) / (n - 1) / n) if n > 1 else float("nan")
        return {"method": self.method, "n": n, "f1": f1, "f1_se": f1_se, "em": mean(self.em),
                "kl": mean(self.kl), "top1": mean(self.top1), "same_answer": mean(self.same),
                "kl_answer": sum(self.kl_answer) / len(self.kl_answer) if self.kl_answer else float("nan"),
                "n_answer": len(self.kl_answer)}
