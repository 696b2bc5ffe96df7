"""End-to-end distillation of consumer decoders through the frozen consumer.

For each calibration prompt, the decoder rebuilds the consumer's K/V for all but the last m
prompt tokens; the consumer runs those m tokens on top of the rebuilt cache, and the loss is
KL(p_oracle || p) at those positions, where p_oracle is the consumer's own prefill. Only the
decoder's parameters learn; the codes are the exact quantized codes served later.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sgl_scd import runtime
from sgl_scd.codec.codec import ConsumerDecoder, Slot


@dataclass
class DistillSample:
    ids: list[int]
    z: dict[Slot, torch.Tensor]  # dequantized codes of tokens [0, len(ids) - m)
    oracle_logp: torch.Tensor  # [m, V] consumer log-probs at the last m prompt positions


def suffix_logits(consumer_model, decoder: ConsumerDecoder, sample: DistillSample) -> torch.Tensor:
    """Consumer logits [m, V] for the last m prompt tokens on top of the rebuilt cache."""
    k, v = decoder.rebuild(consumer_model, sample.z)
    t = k.shape[1]
    cache = runtime.build_cache(consumer_model, k, v)
    suffix = torch.tensor([sample.ids[t:]])
    out = consumer_model(input_ids=suffix, position_ids=torch.arange(t, len(sample.ids))[None],
                         past_key_values=cache, use_cache=True)
    return out.logits[0].float()


def position_weights(m: int, last_weight: float = 4.0) -> torch.Tensor:
    w = torch.ones(m)
    w[-1] = last_weight  # the first answer token matters most
    return w / w.sum()


def kl_loss(logits: torch.Tensor, oracle_logp: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(logits, -1)
    kl = (oracle_logp.exp() * (oracle_logp - logq)).sum(-1)  # [m]
    return (kl * position_weights(kl.shape[0])).sum()


@torch.no_grad()
def last_token_kl(consumer_model, decoder: ConsumerDecoder, samples: list[DistillSample]) -> float:
    """Mean KL at the last prompt position (the first answer token), the serving metric."""
    total = 0.0
    for s in samples:
        logits = suffix_logits(consumer_model, decoder, s)
        lp = s.oracle_logp[-1]
        total += float((lp.exp() * (lp - torch.log_softmax(logits[-1], -1))).sum())
    return total / max(1, len(samples))


def distill(consumer_model, decoder: ConsumerDecoder, train: list[DistillSample], dev: list[DistillSample],
            *, epochs: int = 6, lr: float = 3e-4, batch: int = 8, seed: int = 0, log=print) -> dict:
    """Train decoder in place; keeps the parameters of the epoch with the best dev KL."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best = {"epoch": 0, "dev_kl": last_token_kl(consumer_model, decoder, dev)}
    best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    history = [best["dev_kl"]]
    log(f"distill: closed-form start, dev KL {best['dev_kl']:.4f}")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        decoder.train()
        running = 0.0
        for i in tqdm(range(0, len(order), batch), desc=f"distill epoch {epoch}/{epochs}", file=sys.stderr,
                      leave=False):
            opt.zero_grad(set_to_none=True)
            chunk = order[i : i + batch]
            for j in chunk:
                loss = kl_loss(suffix_logits(consumer_model, decoder, train[j]), train[j].oracle_logp) / len(chunk)
                loss.backward()
                running += loss.item() * len(chunk)
            opt.step()
            sched.step()
        decoder.eval()
        dev_kl = last_token_kl(consumer_model, decoder, dev)
        history.append(dev_kl)
        log(f"distill: epoch {epoch} train loss {running / len(train):.4f} dev KL {dev_kl:.4f}")
        if dev_kl < best["dev_kl"]:
            best = {"epoch": epoch, "dev_kl": dev_kl}
            best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    decoder.load_state_dict(best_state)
    return {**best, "history": history}
