"""No-model unit tests of the codec's pieces: factorization, quantization, bit packing, wire."""

import re

import numpy as np
import pytest
import torch

from sgl_scd.codec import quant, wire
from sgl_scd.codec.codec import (
    ConsumerDecoder,
    ProducerEncoder,
    Slot,
    context_inputs,
    fit_slot_encoder,
    plan_slots,
)
from sgl_scd.codec.factor import joint_factorization, pca, ridge


def test_joint_factorization_recovers_known_rank():
    """Paired data generated from a rank-5 latent: rank 5 reconstructs B almost exactly from A
    alone (the producer side), rank 4 cannot."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 5, generator=g)
    a = z @ torch.randn(5, 40, generator=g) + 3.0
    b = z @ torch.randn(5, 24, generator=g) - 1.0
    a_noisy = a + 1e-3 * torch.randn(a.shape, generator=g)
    jf = joint_factorization(a_noisy, b, rank=5)
    err5 = ((jf.decode_b(jf.encode(a_noisy)) - b).norm() / (b - b.mean(0)).norm()).item()
    jf4 = joint_factorization(a_noisy, b, rank=4)
    err4 = ((jf4.decode_b(jf4.encode(a_noisy)) - b).norm() / (b - b.mean(0)).norm()).item()
    assert err5 < 1e-2, err5  # noise 1e-3 against unit-scale signal
    assert err4 > 0.1, err4  # dropping a true component loses ~1/5 of the energy


def test_ridge_recovers_affine_map():
    x = torch.randn(500, 8)
    w, b = torch.randn(8, 3), torch.randn(3)
    w_hat, b_hat = ridge(x, x @ w + b, lam=1e-8)
    assert torch.allclose(w_hat, w, atol=1e-4) and torch.allclose(b_hat, b, atol=1e-4)


def test_pca_orders_components_by_variance():
    x = torch.randn(3000, 4) * torch.tensor([5.0, 1.0, 3.0, 0.1])
    p = pca(x)
    assert torch.all(p.var[:-1] >= p.var[1:])
    assert abs(p.var[0].item() - 25.0) < 2.5  # ~10% sampling error at n=3000


def test_bit_allocation_follows_variance():
    w = quant.allocate_bits(torch.tensor([100.0, 10.0, 1.0, 0.01]), 12)
    assert w.sum() == 12 and w[0] >= w[1] >= w[2] >= w[3]
    assert w[3] == 0  # a component with 1e-4 of the top variance gets nothing
    with pytest.raises(ValueError, match="-1"):
        quant.allocate_bits(torch.ones(3), -1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantizer_error_matches_gaussian_tables(bits):
    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(bits))
    w = torch.tensor([bits], dtype=torch.int32)
    mse = (quant.dequantize(quant.quantize(z, w), w) - z).pow(2).mean().item()
    # the numerically optimal table value, within 10% (sampling error at n=2e5 is ~1-3%)
    assert abs(mse - quant.GAUSS_MSE[bits]) / quant.GAUSS_MSE[bits] < 0.1


def test_pack_roundtrip_mixed_widths():
    rng = np.random.default_rng(0)
    widths = np.array([1, 3, 8, 0, 5, 3, 2])
    q = np.stack([rng.integers(0, 1 << max(b, 1), 13) if b else np.zeros(13, int) for b in widths], 1)
    blob = quant.pack_bits(q, widths)
    assert len(blob) == quant.packed_size(13, widths)
    assert np.array_equal(quant.unpack_bits(blob, 13, widths), q)
    with pytest.raises(ValueError, match="expected"):
        quant.unpack_bits(blob[:-1], 13, widths)


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    slots = {}
    for s in plan_slots(3, [1]):
        d = 12 if s.kind == "h" else 6
        slots[s] = fit_slot_encoder(torch.randn(400, d) * torch.linspace(2, 0.1, d), 14)
    return ProducerEncoder(slots, 1e5)


def _codes(enc, t):
    return {s: e.encode(torch.randn(t, e.mean.shape[0])) for s, e in enc.slots.items()}


def test_wire_roundtrip(tiny_encoder):
    codes = _codes(tiny_encoder, 37)
    digest = b"d" * 16
    blobs = wire.encode_pages(tiny_encoder, codes, digest, page_size=16, full_pages_only=False)
    assert len(blobs) == 3  # 16 + 16 + 5 tokens
    back = wire.decode_pages(tiny_encoder, blobs, digest, 16)
    for s in tiny_encoder.slots:
        assert torch.equal(back[s], codes[s])
    assert len(wire.encode_pages(tiny_encoder, codes, digest, 16)) == 2  # full pages only


def test_wire_refuses_bad_payloads(tiny_encoder):
    digest = b"d" * 16
    blob = wire.encode_page(tiny_encoder, _codes(tiny_encoder, 16), digest, 0, 16)
    cases = {
        "truncated": (blob[:-3], digest, 0),
        "padded": (blob + b"\0", digest, 0),
        "codec digest": (blob, b"e" * 16, 0),
        "page index": (blob, digest, 1),
        "checksum": (blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], digest, 0),
        "magic": (b"XXXX" + blob[4:], digest, 0),
        "version": (blob[:4] + b"\x09\x00" + blob[6:], digest, 0),
        "shorter than": (blob[:10], digest, 0),
    }
    for what, (b, d, idx) in cases.items():
        with pytest.raises(wire.WireError, match=what):
            wire.decode_page(tiny_encoder, b, d, idx, 16)


def test_slot_names_and_plans():
    assert Slot.parse("L07.k") == Slot(7, "k")
    with pytest.raises(ValueError, match="'q'"):
        Slot(0, "q")
    with pytest.raises(ValueError, match=r"\[40\]"):
        plan_slots(30, [40])
    assert [s.name for s in plan_slots(2, [1])] == ["L00.k", "L00.v", "L01.h"]


def test_decoder_context_inputs():
    slots = plan_slots(6, [2, 5])
    assert all(ins == (s,) for s, ins in context_inputs(slots, "own").items())
    kv = context_inputs(slots, "kv")
    assert kv[Slot(0, "v")] == (Slot(0, "k"), Slot(0, "v")) and kv[Slot(2, "h")] == (Slot(2, "h"),)
    kvh = context_inputs(slots, "kv+h")  # the nearest patch layer; a tie goes to the lower one
    assert kvh[Slot(0, "k")][-1] == Slot(2, "h") and kvh[Slot(4, "k")][-1] == Slot(5, "h")
    assert kvh[Slot(3, "v")] == (Slot(3, "k"), Slot(3, "v"), Slot(2, "h"))
    assert context_inputs(plan_slots(2, []), "kv+h") == context_inputs(plan_slots(2, []), "kv")
    for bad in ("kvh", "kv+h@3", "kv+hall"):
        with pytest.raises(ValueError, match=f"'{bad}'".replace("+", r"\+")):
            context_inputs(slots, bad)
    dims = {s: (3 if s.kind == "h" else 2, 4) for s in slots}
    dec = ConsumerDecoder(dims, {}, 1e4, 1, 4, kvh)  # a translator's input width is the sum of its inputs' ranks
    assert dec.translator(Slot(3, "k")).lin.in_features == 2 + 2 + 3
    with pytest.raises(ValueError, match="L09.h"):
        ConsumerDecoder(dims, {}, 1e4, 1, 4, {Slot(0, "k"): (Slot(9, "h"),)})


def test_vectorized_dequantize_equals_per_slot(tiny_encoder):
    codes = _codes(tiny_encoder, 21)
    fast = tiny_encoder.dequantize(codes)
    for s, e in tiny_encoder.slots.items():
        assert torch.allclose(fast[s], e.dequantize(codes[s]), atol=1e-6)


def test_unpack_pages_equals_page_by_page():
    rng = np.random.default_rng(1)
    widths = np.array([2, 3, 3, 5, 0, 8])
    pages = [np.stack([rng.integers(0, 1 << max(b, 1), 16) if b else np.zeros(16, int) for b in widths], 1)
             for _ in range(4)]
    blobs = [quant.pack_bits(q, widths) for q in pages]
    assert np.array_equal(quant.unpack_pages(blobs, 16, widths), np.concatenate(pages))


def _reference_unpack(blob: bytes, num_tokens: int, widths: np.ndarray) -> np.ndarray:
    """The wire layout read the slow, obvious way: per width group, the group's bytes as one
    little-endian integer and field k at bits [k*b, (k+1)*b)."""
    out, off = np.zeros((num_tokens, len(widths)), np.int64), 0
    for b in sorted(set(widths.tolist()) - {0}):
        cols = np.flatnonzero(widths == b)
        nbytes = (num_tokens * len(cols) * b + 7) // 8
        stream = int.from_bytes(blob[off : off + nbytes], "little")
        for k in range(num_tokens * len(cols)):
            out[k // len(cols), cols[k % len(cols)]] = (stream >> (k * b)) & ((1 << b) - 1)
        off += nbytes
    return out


@pytest.mark.parametrize("num_tokens", [1, 5, 8, 13, 64])
def test_unpack_matches_the_layout_for_every_width(num_tokens):
    """Every width 1..8, in runs and interleaved (PCA order gives runs; any order must work),
    token counts that do and do not fill whole 8-field chunks."""
    rng = np.random.default_rng(num_tokens)
    widths = np.concatenate([np.arange(8, -1, -1), rng.integers(0, 9, 23), [1, 1, 7, 7, 7, 3]])
    q = np.stack([rng.integers(0, 1 << b, num_tokens) for b in widths], 1)  # width 0 -> 0
    blob = quant.pack_bits(q, widths)
    assert np.array_equal(_reference_unpack(blob, num_tokens, widths), q)
    assert np.array_equal(quant.unpack_bits(blob, num_tokens, widths), q)
    assert np.array_equal(quant.unpack_pages([blob, blob], num_tokens, widths), np.concatenate([q, q]))


def test_position_weights_keep_the_last_share():
    from sgl_scd.calibration.distill import position_weights

    for p in (2, 24, 48):
        w = position_weights(p)
        assert abs(float(w.sum()) - 1) < 1e-6 and abs(float(w[-1]) - 0.15) < 1e-6
        assert torch.allclose(w[:-1], torch.full((p - 1,), 0.85 / (p - 1)))
    assert position_weights(1).tolist() == [1.0]


def test_position_weights_give_answer_tokens_their_share():
    from sgl_scd.calibration.distill import position_weights

    w = position_weights(24, 0.15, n_answer=3, answer_share=0.2)
    assert w.shape == (27,) and abs(float(w.sum()) - 1) < 1e-6
    assert torch.allclose(w[24:], torch.full((3,), 0.2 / 3))  # the answer tokens share answer_share
    assert abs(float(w[23]) - 0.15 * 0.8) < 1e-6  # the prompt positions keep their split of the rest
    assert torch.equal(position_weights(24, 0.15, n_answer=0, answer_share=0.2), position_weights(24, 0.15))


def test_length_groups_split_short_and_long_prompts():
    from sgl_scd.calibration.distill import LONG_PROMPT_TOKENS, DistillSample, length_groups

    def sample(n):
        return DistillSample(list(range(n)), {}, [n - 1], torch.zeros(1, 4))

    groups = length_groups([sample(80), sample(LONG_PROMPT_TOKENS), sample(120), sample(900)])
    assert {k: [len(s.ids) for s in v] for k, v in groups.items()} == {
        "long": [LONG_PROMPT_TOKENS, 900], "short": [80, 120]}
    assert list(length_groups([sample(80)])) == ["short"]  # no empty group to average in


def test_group_weights_give_the_long_group_its_share():
    from sgl_scd.calibration.distill import DistillSample, group_weights

    samples = [DistillSample(list(range(n)), {}, [n - 1], torch.zeros(1, 4)) for n in [90] * 18 + [700, 1100]]
    w = group_weights(samples, 0.25)
    assert abs(sum(w) / len(w) - 1) < 1e-9  # mean 1: the loss scale (and the learning rate) unchanged
    assert abs(sum(w[18:]) / sum(w) - 0.25) < 1e-9 and len(set(w[:18])) == 1
    assert group_weights(samples, None) == [1.0] * 20
    assert group_weights(samples[:18], 0.25) == [1.0] * 18  # no long prompts: nothing to balance
    with pytest.raises(ValueError, match="long_share must be in"):
        group_weights(samples, 1.5)


def test_micro_batches_pack_within_the_token_budget():
    from sgl_scd.calibration.distill import micro_batches

    lengths = [90, 1100, 120, 80, 700, 100, 95, 130]
    mbs = micro_batches(lengths, 1024)
    assert sorted(i for mb in mbs for i in mb) == list(range(8))  # every prompt exactly once
    for mb in mbs:  # padded size within budget, or a single prompt over it
        assert len(mb) == 1 or max(lengths[i] for i in mb) * len(mb) <= 1024
    assert [len(mb) for mb in mbs] == [1, 1, 6]  # the six short prompts share one forward


def test_fit_subset_spreads_over_the_whole_set():
    from sgl_scd.calibrate import fit_subset

    assert fit_subset(10, 20) == list(range(10))
    idx = fit_subset(1072, 544)
    assert len(idx) == 544 and idx == sorted(set(idx)) and idx[0] == 0
    assert sum(i >= 1024 for i in idx) >= 20  # the long prompts at the end are fitted too


def test_low_rank_delta_merges_into_the_plain_form():
    from sgl_scd.codec.codec import Translator

    t = Translator(8, 12, hidden=4)
    t.start_low_rank(2, torch.Generator().manual_seed(0))
    params = {n for n, p in t.named_parameters() if p.requires_grad}
    assert "lin.weight" not in params and {"delta_a", "delta_b", "lin.bias"} <= params
    with torch.no_grad():
        t.delta_b.normal_()
    z = torch.randn(5, 8)
    before = t(z)
    t.merge_low_rank()
    assert torch.allclose(t(z), before, atol=1e-5)
    assert set(t.state_dict()) == set(Translator(8, 12, hidden=4).state_dict())  # saved format unchanged


@pytest.mark.parametrize("flag,value", [("--bits-per-dim", "0.0"), ("--patch-bits-per-dim", "-1.0"),
                                        ("--last-share", "1.5"), ("--delta-rank", "-2"),
                                        ("--answer-tokens", "-1"), ("--answer-share", "1.0"),
                                        ("--suffix-share", "1.5"),
                                        ("--patch-layers", "1,x"), ("--encoder", "/nonexistent"),
                                        ("--decoder-context", "kv+h@3")])
def test_calibrate_refuses_bad_flags_naming_the_value(flag, value, capsys):
    from sgl_scd import calibrate

    with pytest.raises(SystemExit):  # argparse error, before any model is loaded
        calibrate.main(["--consumer", "demo-ft", flag, value])
    err = capsys.readouterr().err
    assert flag in err and re.search(f"got '?{re.escape(value)}", err)


def test_unwhiten_inverts_whiten_when_every_component_is_kept():
    torch.manual_seed(0)
    x = torch.randn(300, 6) * torch.linspace(2, 0.5, 6) + 1.0
    e = fit_slot_encoder(x, 6 * 8)  # 8 bits per dim: every component gets bits, the basis is square
    assert e.rank == 6 and torch.allclose(e.unwhiten(e.whiten(x)), x, atol=1e-4)
