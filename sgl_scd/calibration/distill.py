"""End-to-end distillation of consumer decoders through the frozen consumer.

For each calibration prompt, the decoder rebuilds the consumer's K/V for every prompt token;
the consumer runs the prompt attending to the rebuilt K/V at every layer
(runtime.logits_with_kv, several short prompts per forward), and the loss is KL(p_oracle || p)
at sampled positions (24 by default; the last one keeps last_share, 15% by default), where p_oracle is
the consumer's own prefill. Long prompts are a few percent of the samples; group_weights lets
them carry a chosen share of the loss instead.
Supervising many positions, not only the few chat-template tokens at the end, is what keeps a
few hundred prompts from overfitting. Optionally the oracle's own greedy answer tokens are
appended (teacher-forced, with the oracle's K/V) and their positions supervised too, so the
rebuilt cache is also trained on what the answer's later tokens read from it (answer_share).
A sample may carry `reuse`: then only its first `reuse` tokens (its story's whole pages) read the
rebuilt K/V and the rest (question, answer) runs on the consumer's own, as a shared prefix is served.
Only the decoder learns; the codes are the exact quantized codes served later.
Model selection uses the exact serving path (last_token_kl) on held-out prompts, scored per
length group (dev_score): a pooled mean over ~100-token and ~1k-token prompts lets one group hide
the other's regression.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sgl_scd.codec.codec import ConsumerDecoder, Slot
from sgl_scd.hf import runtime


@dataclass
class DistillSample:
    ids: list[int]
    z: dict[Slot, torch.Tensor]  # dequantized codes of every prompt token, {slot: [n, r]}
    positions: list[int]  # supervised prompt positions; the last one is n - 1
    oracle_logp: torch.Tensor  # [P, V] the consumer's own log-probs there (fp16 to save memory)
    answer: list[int] = field(default_factory=list)  # the oracle's greedy answer tokens, teacher-forced
    answer_k: torch.Tensor | None = None  # [L, A, H_kv, D] the oracle's K/V of those tokens (fp16)
    answer_v: torch.Tensor | None = None
    answer_logp: torch.Tensor | None = None  # [A, V] the oracle's log-probs after each of them (fp16)
    reuse: int | None = None  # rebuild only the first `reuse` tokens, the consumer prefills the rest


def position_weights(p: int, last_share: float = 0.15, n_answer: int = 0, answer_share: float = 0.0
                     ) -> torch.Tensor:
    """Weights summing to 1 over p prompt positions then n_answer answer positions: the answer
    positions share answer_share equally (when there are any); of the rest, the first answer token
    (last prompt position) keeps last_share whatever the number of sampled positions (it matters
    most) and the other prompt positions share what is left equally."""
    if p == 1:
        w = torch.ones(1)
    else:
        w = torch.full((p,), (1.0 - last_share) / (p - 1))
        w[-1] = last_share
    if n_answer == 0:
        return w
    return torch.cat([w * (1.0 - answer_share), torch.full((n_answer,), answer_share / n_answer)])


def kl_rows(oracle_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(oracle || softmax(logits)) per row ([..., V] -> [...]), differentiable in logits."""
    lp = oracle_logp.float()
    return (lp.exp() * (lp - torch.log_softmax(logits, -1))).sum(-1)


def consumer_projections(consumer_model, decoder: ConsumerDecoder):
    """The consumer's projections at the decoder's patch layers (views of the frozen weights)."""
    return runtime.projections(consumer_model, [s.layer for s in decoder.slots if s.kind == "h"])


def _with_answer(s: DistillSample, k: torch.Tensor, v: torch.Tensor):
    """(ids, k, v, positions, oracle log-probs) of the prompt followed by its teacher-forced answer."""
    if not s.answer:
        return s.ids, k, v, s.positions, s.oracle_logp
    n = len(s.ids)
    return (s.ids + s.answer, torch.cat([k, s.answer_k.to(k.dtype)], 1), torch.cat([v, s.answer_v.to(v.dtype)], 1),
            s.positions + list(range(n, n + len(s.answer))), torch.cat([s.oracle_logp, s.answer_logp]))


def batch_loss(consumer_model, decoder: ConsumerDecoder, samples: list[DistillSample],
               weights: list[float], last_share: float = 0.15, answer_share: float = 0.15) -> torch.Tensor:
    """Sum over samples of weight x position-weighted KL(oracle || consumer attending to the
    rebuilt K/V), the samples run as one forward."""
    proj = consumer_projections(consumer_model, decoder)
    ids, k, v, positions, oracle_logp = zip(*(_with_answer(s, *decoder.rebuild(proj, s.z))
                                              for s in samples))
    given = None
    if any(s.reuse is not None for s in samples):  # the rest (question, answer) runs on the consumer's own K/V
        given = [len(x) if s.reuse is None else s.reuse for s, x in zip(samples, ids)]
    logits = runtime.logits_with_kv(consumer_model, list(ids), list(k), list(v), list(positions), given)
    total = torch.zeros(())
    for s, w, lg, lp in zip(samples, weights, logits, oracle_logp):
        kl = kl_rows(lp, lg)  # [P + A]
        total = total + w * (kl * position_weights(len(s.positions), last_share, len(s.answer), answer_share)).sum()
    return total


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices into lengths packed, longest first, into forwards of at most max_tokens padded
    tokens (a prompt longer than that runs alone)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def last_token_kl(consumer_model, decoder: ConsumerDecoder, samples: list[DistillSample]) -> float:
    """Mean KL at the first answer token when all but the last prompt token (or a sample's
    `reuse` tokens) are rebuilt: the serving path exactly (rebuild -> cache -> prefill the rest)."""
    total = 0.0
    proj = consumer_projections(consumer_model, decoder)
    for s in samples:
        n = len(s.ids)
        r = n - 1 if s.reuse is None else s.reuse
        k, v = decoder.rebuild(proj, {slot: z[:r] for slot, z in s.z.items()})
        cache = runtime.build_cache(consumer_model, k, v)
        logits = consumer_model(input_ids=torch.tensor([s.ids[r:]]), position_ids=torch.tensor([list(range(r, n))]),
                                past_key_values=cache, use_cache=True).logits[0, -1].float()
        total += float(kl_rows(s.oracle_logp[-1], logits))
    return total / max(1, len(samples))


LONG_PROMPT_TOKENS = 256  # ToMi prompts are ~70-150 tokens, the long calibration prompts 500-1,200


def length_group(s: DistillSample) -> str:
    return "long" if len(s.ids) >= LONG_PROMPT_TOKENS else "short"


def length_groups(samples: list[DistillSample]) -> dict[str, list[DistillSample]]:
    """Samples split into "long" (>= LONG_PROMPT_TOKENS) and "short"; empty groups left out."""
    groups: dict[str, list[DistillSample]] = {}
    for s in samples:
        groups.setdefault(length_group(s), []).append(s)
    return dict(sorted(groups.items()))


def dev_score(consumer_model, decoder: ConsumerDecoder, samples: list[DistillSample]) -> tuple[float, dict]:
    """Selection score: the mean over length groups of each group's mean last-token KL, so both
    groups count equally whatever their sizes; and the per-group KLs."""
    by_group = {name: last_token_kl(consumer_model, decoder, ss) for name, ss in length_groups(samples).items()}
    return sum(by_group.values()) / max(1, len(by_group)), by_group


def group_weights(samples: list[DistillSample], long_share: float | None) -> list[float]:
    """Per-sample loss weights (mean 1) giving the long group long_share of the total weight;
    None (or a single group) weighs every sample the same."""
    groups = length_groups(samples)
    if long_share is None or len(groups) < 2:
        return [1.0] * len(samples)
    if not 0.0 < long_share < 1.0:
        raise ValueError(f"long_share must be in (0, 1), got {long_share}")
    n = len(samples)
    per = {"long": long_share * n / len(groups["long"]), "short": (1 - long_share) * n / len(groups["short"])}
    return [per[length_group(s)] for s in samples]


def _fmt(by_group: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in by_group.items())


def distill(consumer_model, decoder: ConsumerDecoder, train: list[DistillSample], dev: list[DistillSample],
            *, epochs: int = 6, lr: float = 3e-4, batch: int = 8, seed: int = 0, delta_rank: int = 0,
            long_share: float | None = None, last_share: float = 0.15, answer_share: float = 0.15,
            max_tokens: int = 1024, lr_scale: dict[Slot, float] | None = None, log=print) -> dict:
    """Train decoder in place; keeps the parameters of the epoch with the best dev_score.

    delta_rank > 0 trains only a rank-delta_rank correction of each affine map (plus biases and
    the patch MLPs) instead of the whole map: far fewer parameters for the same data.
    long_share: the long prompts' share of the loss (group_weights); last_share: each prompt's
    loss share on its first answer token and answer_share that on its teacher-forced answer
    tokens, if the samples carry any (position_weights); max_tokens: padded tokens
    per forward (micro_batches; the gradient is the same, short prompts just run together);
    lr_scale: per-slot multipliers of lr (default 1; 0 keeps that translator at its closed form).
    Adam moves every weight by about lr per step, so a map's output moves in proportion to its
    input width: a translator reading 8 codes moves ~8x faster than one reading its own."""
    g = torch.Generator().manual_seed(seed)
    weights = group_weights(train, long_share)
    scale = {s: (lr_scale or {}).get(s, 1.0) for s in decoder.slots}
    for s in decoder.slots:
        decoder.translator(s).requires_grad_(scale[s] > 0)
    translators = {s: decoder.translator(s) for s in decoder.slots if scale[s] > 0}
    if delta_rank > 0:
        for t in translators.values():
            t.start_low_rank(delta_rank, g)
    opt = torch.optim.Adam([{"params": [p for p in t.parameters() if p.requires_grad], "lr": lr * scale[s]}
                            for s, t in translators.items()], lr=lr)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    score, by_group = dev_score(consumer_model, decoder, dev)
    best = {"epoch": 0, "dev_kl": score, "dev_kl_by_group": by_group}
    best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    history = [by_group]
    log(f"distill: closed-form start, dev KL {score:.4f} ({_fmt(by_group)})")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        decoder.train()
        running = 0.0
        for i in tqdm(range(0, len(order), batch), desc=f"distill epoch {epoch}/{epochs}", file=sys.stderr,
                      leave=False):
            opt.zero_grad(set_to_none=True)
            chunk = order[i : i + batch]
            for mb in micro_batches([len(train[j].ids) + len(train[j].answer) for j in chunk], max_tokens):
                js = [chunk[m] for m in mb]
                loss = batch_loss(consumer_model, decoder, [train[j] for j in js], [weights[j] for j in js],
                                  last_share, answer_share) / len(chunk)
                loss.backward()
                running += loss.item() * len(chunk)
            opt.step()
            sched.step()
        decoder.eval()
        score, by_group = dev_score(consumer_model, decoder, dev)
        history.append(by_group)
        log(f"distill: epoch {epoch} train loss {running / len(train):.4f} dev KL {score:.4f} ({_fmt(by_group)})")
        if score < best["dev_kl"]:
            best = {"epoch": epoch, "dev_kl": score, "dev_kl_by_group": by_group}
            best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    decoder.load_state_dict(best_state)
    for t in translators.values():
        t.merge_low_rank()
    return {**best, "history": history}
