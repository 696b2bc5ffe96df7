#!/usr/bin/env python
"""Closed-form ablations of the SCD codec's design choices, measured on held-out dev KL.

Captures the pair once, then for each variant fits encoders + ridge decoders on the
calibration prompts and reports the mean next-token KL vs the oracle on held-out prompts
(no distillation, so each variant costs seconds). One JSON line per variant.

Variants: bits per dimension (payload), basis (producer PCA vs the paper's joint
factorization), per-layer vs per-head codes, patch layers vs pure reuse, how bits are split
between reuse (K/V) and patch (normalized input) codes, and which codes a reuse decoder reads
(its own, its layer's K and V, plus the nearest patch layer's), and what the patch codes' PCA
measures (the normalized input itself, or the K/V it turns into: calibrate --patch-metric).

  python scripts/ablate_codec.py --n-calib 96 --n-dev 32 --json out/ablate.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from tqdm import tqdm

from sgl_scd.calibrate import (
    capture_pair,
    decoder_for,
    distill_samples,
    fit_codec,
    rank_patch_layers,
)
from sgl_scd.calibration import distill, importance
from sgl_scd.codec import manifest as mf
from sgl_scd.codec import quant
from sgl_scd.codec.codec import ProducerEncoder, SlotEncoder, fit_slot_encoder
from sgl_scd.codec.factor import joint_factorization, pca
from sgl_scd.demo import data
from sgl_scd.hf import models
from sgl_scd.runinfo import provenance, write_jsonl


def kl_of(encoder, affine, patch, consumer, ident, dev, hidden, context="own", train=None):
    enc, dec = decoder_for(encoder, affine, patch, hidden, ident, context, train)
    return distill.last_token_kl(consumer.model, dec, distill_samples(enc, dev)), enc.bits_per_token()


def joint_encoder(x, y, budget_bits):
    """Paper's reading: joint SVD of [A | B] -> consumer-specific code, ridge producer encoder."""
    jf = joint_factorization(x, y, rank=x.shape[1])
    var = jf.encode(x).var(0)  # variance of the joint code, computed from the producer alone
    widths = quant.allocate_bits(var, budget_bits)
    keep = widths > 0
    # basis = the encoder's columns (not orthonormal; SlotEncoder only projects with it)
    return SlotEncoder(jf.mean_a, jf.enc[:, keep].contiguous(), var[keep].clamp_min(1e-12).sqrt(),
                       widths[keep].to(torch.int32))


def per_head_encoder(heads):
    """Separate PCA per KV head (block-diagonal basis) instead of one per layer."""

    def fit(x, _y, budget_bits):
        d = x.shape[1] // heads
        parts = [fit_slot_encoder(x[:, h * d:(h + 1) * d], budget_bits // heads) for h in range(heads)]
        basis = torch.zeros(x.shape[1], sum(p.rank for p in parts))
        col = 0
        for h, p in enumerate(parts):
            basis[h * d:(h + 1) * d, col:col + p.rank] = p.basis
            col += p.rank
        return SlotEncoder(torch.cat([p.mean for p in parts]), basis, torch.cat([p.std for p in parts]),
                           torch.cat([p.widths for p in parts]))

    return fit


def full_rank_8bit_encoder(x, _y, _budget_bits):
    """Every PCA component at 8 bits, whatever the budget."""
    pc = pca(x)
    return SlotEncoder(pc.mean, pc.basis, pc.var.clamp_min(1e-12).sqrt(),
                       torch.full((pc.basis.shape[1],), 8, dtype=torch.int32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producer", default="base")
    p.add_argument("--consumer", default="demo-ft")
    p.add_argument("--n-calib", type=int, default=96)
    p.add_argument("--n-dev", type=int, default=32)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    prod, cons = models.load(args.producer), models.load(args.consumer)
    tok = cons.tokenizer
    rng = random.Random(0)
    train = [capture_pair(prod, cons, data.prompt_ids(tok, it), 1, rng)
             for it in tqdm(data.load_tomi("train")[1000:1000 + args.n_calib], desc="capture", file=sys.stderr)]
    dev = [capture_pair(prod, cons, data.prompt_ids(tok, it), 1, rng)
           for it in tqdm(data.load_tomi("dev")[:args.n_dev], desc="capture dev", file=sys.stderr)]
    ident = mf.model_identity(cons)
    theta = prod.config.rope_parameters["rope_theta"]
    hidden = {"k": 0, "v": 0, "h": 0}
    kv = cons.config.num_key_value_heads * cons.config.head_dim
    rows = []

    def emit(name, kl, bits_tok, **extra):
        row = {"variant": name, "dev_kl": kl, "bits_per_token": bits_tok,
               "payload_ratio": bits_tok / 8 / (2 * ident["num_layers"] * kv * 2), **extra}
        rows.append(row)
        print(json.dumps({**row, **provenance(vars(args))}), flush=True)
        print(f"[ablate] {name:<40} dev KL {kl:.4f}  payload {row['payload_ratio']:.3f}x", file=sys.stderr)

    fits = {}  # bits per K/V dim
    h_fits = {}  # h slots by their bit budget: each reuse fit brings one (2 x its K/V budget)
    for bpd in (2.0, 3.0, 4.0, 6.0):
        bits = {"k": round(bpd * kv), "v": round(bpd * kv), "h": round(bpd * kv * 2)}
        fits[bpd] = enc, aff = fit_codec(train, bits, theta, 1e-3)
        h_fits[bits["h"]] = fits[bpd]
        kl, bt = kl_of(enc, aff, [], cons, ident, dev, hidden)
        emit(f"reuse producer-pca {bpd} bits/dim", kl, bt, bits_per_dim=bpd, basis="producer-pca")
    base_enc, base_aff = fits[3.0]
    bits3 = {"k": 3 * kv, "v": 3 * kv, "h": 6 * kv}
    enc, aff = fit_codec(train, bits3, theta, 1e-3, joint_encoder, kinds=("k", "v"))
    emit("reuse joint-svd 3.0 bits/dim", *kl_of(enc, aff, [], cons, ident, dev, hidden), basis="joint")
    enc, aff = fit_codec(train, bits3, theta, 1e-3, per_head_encoder(cons.config.num_key_value_heads),
                         kinds=("k", "v"))
    emit("reuse per-head pca 3.0 bits/dim", *kl_of(enc, aff, [], cons, ident, dev, hidden), basis="per-head")
    # every component at 8 bits: the closed-form ceiling of linear reuse
    fr_enc, fr_aff = fit_codec(train, bits3, theta, 1e-3, full_rank_8bit_encoder, kinds=("k", "v"))
    emit("reuse producer-pca 8 bits/dim (near lossless)", *kl_of(fr_enc, fr_aff, [], cons, ident, dev, hidden))
    ranked = rank_patch_layers(base_enc, base_aff, cons, ident, dev, hidden)
    for k in (1, 2, 4, 6, 8):
        patch = sorted(layer for layer, _ in ranked[:k])
        emit(f"patch top-{k} {patch}", *kl_of(base_enc, base_aff, patch, cons, ident, dev, hidden), patch=patch)
    emit("patch every layer", *kl_of(base_enc, base_aff, list(range(ident["num_layers"])), cons, ident, dev, hidden))
    # top-8 patch set, bits split between reuse (K/V) and patch (h) codes: which buys more KL per bit
    patch = sorted(layer for layer, _ in ranked[:8])
    hidden_size = cons.config.hidden_size

    def with_h_codes(kv_fit, h_fit_):  # one codec: the reuse slots of kv_fit, the patch (h) slots of h_fit_
        (enc_kv, aff_kv), (enc_h, aff_h) = kv_fit, h_fit_
        enc = ProducerEncoder({s: (enc_h if s.kind == "h" else enc_kv).slots[s] for s in enc_kv.slots}, theta)
        return enc, {s: (aff_h if s.kind == "h" else aff_kv)[s] for s in enc_kv.slots}

    def h_fit(h_bpd):  # encoders + decoders of h slots at h_bpd bits per hidden dim, fitted once
        b = round(h_bpd * hidden_size)
        if b not in h_fits:
            h_fits[b] = fit_codec(train, {"k": 0, "v": 0, "h": b}, theta, 1e-3, kinds=("h",))
        return h_fits[b]

    for kv_bpd in (3.0, 6.0):
        for h_bpd in (2.0, 4.0):
            enc, aff = with_h_codes(fits[kv_bpd], h_fit(h_bpd))
            emit(f"patch top-8, reuse {kv_bpd} bits/dim, patch {h_bpd} bits/hidden dim",
                 *kl_of(enc, aff, patch, cons, ident, dev, hidden), patch=patch, bits_per_dim=kv_bpd,
                 patch_bits_per_dim=h_bpd)
    enc, aff = with_h_codes(fits[3.0], h_fit(4.0))
    for context in ("own", "kv", "kv+h"):  # the demo plan's bits; context adds no payload
        emit(f"patch top-8, reuse 3 / patch 4 bits, decoder context {context}",
             *kl_of(enc, aff, patch, cons, ident, dev, hidden, context, train), patch=patch, context=context)
    # the same bytes with the h codes' PCA in the K/V metric of the producer's projections (calibrate --patch-metric kv)
    enc, aff = with_h_codes(fits[3.0], fit_codec(train, {"k": 0, "v": 0, "h": round(4.0 * hidden_size)}, theta, 1e-3,
                                                 kinds=("h",), metric=lambda s: importance.kv_metric(prod.model, s.layer)))
    emit("patch top-8, reuse 3 / patch 4 bits, decoder context kv+h, h codes in the K/V metric",
         *kl_of(enc, aff, patch, cons, ident, dev, hidden, "kv+h", train), patch=patch, context="kv+h", metric="kv")
    write_jsonl(args.json, rows, vars(args))


if __name__ == "__main__":
    main()
