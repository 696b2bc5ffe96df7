"""The engine-neutral core: producer states at any position, consumer projections as tensors
(LoRA unmerged), one layer's rebuild for any run of pages, wire pages from any first page."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sgl_scd.codec import rope, wire
from sgl_scd.codec.codec import (
    ConsumerDecoder,
    ProducerEncoder,
    context_inputs,
    fit_slot_encoder,
    plan_slots,
)
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.states import ConsumerProjections, KVProjection, LoraDelta, ProducerStates

L, H, D, HID, PS = 4, 2, 8, 32, 4
KV = H * D
PATCH = [2]


def _setup(context: str = "kv+h", lora: bool = True):
    torch.manual_seed(0)
    slots = plan_slots(L, PATCH)
    enc = ProducerEncoder({s: fit_slot_encoder(torch.randn(256, HID if s.kind == "h" else KV), 40) for s in slots}, 1e4)
    dims = {s: (e.rank, HID if s.kind == "h" else KV) for s, e in enc.slots.items()}
    dec = ConsumerDecoder(dims, {"k": 0, "v": 0, "h": 16}, 1e6, H, D, context_inputs(slots, context))
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.1)
    layers = {}
    for layer in PATCH:
        delta = (lambda: LoraDelta(torch.randn(4, HID) * 0.1, torch.randn(KV, 4) * 0.1, 2.0)) if lora else (lambda: None)
        layers[layer] = KVProjection(torch.randn(KV, HID) * 0.2, torch.randn(KV, HID) * 0.2, torch.randn(KV) * 0.1,
                                     None, delta(), delta())
    return enc, dec, ConsumerProjections(1e6, H, D, layers)


def _save_artifacts(root, adapter_dir: str = "tiny-lora"):
    """_setup's random encoder and decoder saved as real artifacts: root/enc and root/<adapter_dir>
    (adapter "tiny-lora": consumer RoPE base 1e6, calibrated to 6 pages). (encoder dir, adapter dir,
    the consumer projections)."""
    import dataclasses

    from sgl_scd.codec import manifest as mf

    enc, dec, proj = _setup()
    ident = mf.ModelIdentity("tiny", "r" * 64, 1e4, L, H, D, HID)
    em = mf.EncoderManifest(name="enc", producer=ident, tokenizer_digest="t" * 64, revision=mf.encoder_revision(enc),
                            page_size=PS, h_layers=enc.patch_layers, bits_per_token=enc.bits_per_token(),
                            payload_bytes_per_token=100.0, raw_kv_bytes_per_token=128, payload_ratio=100 / 128)
    mf.save_encoder(root / "enc", em, enc)
    am = mf.AdapterManifest(name="tiny-lora", consumer=dataclasses.replace(ident, rope_theta=1e6), encoder="enc",
                            encoder_revision=em.revision, decoder_context="kv+h", decoder_hidden={"h": 16},
                            max_tokens=6 * PS)
    mf.save_adapter(root / adapter_dir, am, dec)
    return root / "enc", root / adapter_dir, proj


def _states(t: int, start: int = 0) -> ProducerStates:
    g = torch.Generator().manual_seed(1)
    k_nope = torch.randn(L, t, H, D, generator=g)
    return ProducerStates(rope.rotate(k_nope, 1e4, start), torch.randn(L, t, H, D, generator=g),
                          {layer: torch.randn(t, HID, generator=g) for layer in PATCH}, 1e4, start)


def test_rebuild_of_one_layer_for_pages_p0_p1_equals_the_whole_prompt_slice():
    """Exact up to fp32 rounding (1e-5 relative): the same maps, rows computed in a different batch."""
    enc, dec, proj = _setup()
    fold = FoldedDecoder(dec, enc, proj)
    t = 5 * PS + 3  # a partial last page
    codes = enc.encode(_states(t))
    k_all, v_all = fold.rebuild(codes)
    for layer in range(L):
        for p0, p1 in ((0, 1), (2, 4), (3, 6)):
            lo, hi = p0 * PS, min(p1 * PS, t)
            k, v = fold.rebuild_layer(layer, {s: q[lo:hi] for s, q in codes.items()}, start=lo)
            assert torch.allclose(k, k_all[layer, lo:hi], rtol=1e-5, atol=1e-5 * k_all.abs().max())
            assert torch.allclose(v, v_all[layer, lo:hi], rtol=1e-5, atol=1e-5 * v_all.abs().max())


def test_rebuild_layer_writes_into_caller_buffers_of_another_dtype():
    enc, dec, proj = _setup()
    fold = FoldedDecoder(dec, enc, proj)
    codes = enc.encode(_states(2 * PS))
    pool_k, pool_v = torch.zeros(10, H, D, dtype=torch.bfloat16), torch.zeros(10, H, D, dtype=torch.bfloat16)
    k, _ = fold.rebuild_layer(1, codes, start=0)
    fold.rebuild_layer(1, codes, start=0, out=(pool_k[2:10], pool_v[2:10]))
    # bf16 keeps 8 mantissa bits: 1% relative
    assert torch.allclose(pool_k[2:10].float(), k, rtol=1e-2, atol=1e-2 * k.abs().max())
    assert pool_k[:2].abs().sum() == 0 and pool_v[:2].abs().sum() == 0


def test_unmerged_lora_projections_equal_their_merged_weights():
    """The fold merges LoRA deltas in float64; the trainable path applies them unmerged."""
    enc, dec, proj = _setup(lora=True)
    merged = {}
    for layer, p in proj.layers.items():
        w, b = p.merged()
        merged[layer] = KVProjection(w[:KV].float(), w[KV:].float(), b[:KV].float(), b[KV:].float())
    codes = enc.encode(_states(3 * PS))
    with torch.no_grad():
        k1, v1 = dec.rebuild(proj, enc.dequantize(codes))
        k2, v2 = dec.rebuild(ConsumerProjections(1e6, H, D, merged), enc.dequantize(codes))
    k3, v3 = FoldedDecoder(dec, enc, proj).rebuild(codes)
    for a, b in ((k1, k2), (v1, v2), (k1, k3), (v1, v3)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max())


def test_fused_qkv_slices_k_and_v_rows():
    w, b = torch.randn(3 * KV, HID), torch.randn(3 * KV)
    p = KVProjection.from_fused_qkv(w, b, KV, KV)
    assert torch.equal(p.k_weight, w[KV : 2 * KV]) and torch.equal(p.v_bias, b[2 * KV :])
    with pytest.raises(ValueError, match="rows"):
        KVProjection.from_fused_qkv(w, b, 2 * KV, KV)


def test_states_at_an_offset_encode_like_the_whole_prompt():
    """A prefix already on the device: the tokens after it, at their absolute positions, give the
    same codes as encoding the whole prompt and slicing (de-rotation uses the positions)."""
    enc, _, _ = _setup()
    whole = _states(6 * PS)
    codes = enc.encode(whole)
    part = enc.encode(whole.slice(2 * PS, 5 * PS))
    for s in codes:
        assert torch.equal(part[s], codes[s][2 * PS : 5 * PS]), s.name


def test_wire_pages_from_a_first_page_and_the_valid_prefix():
    enc, _, _ = _setup()
    digest = b"d" * 16
    codes = enc.encode(_states(6 * PS))
    blobs = wire.encode_pages(enc, codes, digest, PS)
    tail = wire.decode_pages(enc, blobs[2:5], digest, PS, first_page=2)
    for s in codes:
        assert torch.equal(tail[s], codes[s][2 * PS : 5 * PS])
    with pytest.raises(wire.WireError, match="page index 2 where 0"):
        wire.decode_pages(enc, blobs[2:5], digest, PS)
    bad = blobs[:3] + [blobs[3][:-1] + bytes([blobs[3][-1] ^ 1])] + blobs[4:]
    n, err = wire.valid_prefix(enc, bad, digest, PS)
    assert n == 3 and "checksum" in str(err)
    assert wire.valid_prefix(enc, blobs, digest, PS) == (len(blobs), None)


@pytest.mark.parametrize("bad, needle", [
    ({"k": torch.zeros(2, 3, 4)}, "shape"),
    ({"start": -1}, "start"),
    ({"h": {0: torch.zeros(5, HID)}}, "h of layer 0"),
])
def test_producer_states_refuse_bad_shapes_naming_them(bad, needle):
    good = {"k": torch.zeros(L, 3, H, D), "v": torch.zeros(L, 3, H, D), "h": {}, "theta": 1e4, "start": 0}
    if "k" in bad:
        good["v"] = bad["k"]
    with pytest.raises(ValueError, match=needle):
        ProducerStates(**{**good, **bad})


def test_codec_imports_no_engine():
    """Every codec module imports with torch and numpy only: transformers and the HF engine are
    never loaded (the codec is what SGLang's process imports). Import time is not asserted here
    (timed tests flake on a shared machine); the quantizer tables it once solved at import are
    constants checked by test_quant_tables.py."""
    code = (
        "import sys; import torch, numpy;"
        "import sgl_scd.codec.codec, sgl_scd.codec.fold, sgl_scd.codec.wire, sgl_scd.codec.manifest,"
        " sgl_scd.codec.quant, sgl_scd.codec.states, sgl_scd.codec.factor, sgl_scd.codec.rope;"
        "print('transformers' in sys.modules, 'sgl_scd.hf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the bf16 device rebuild")
def test_gpu_bf16_rebuild_matches_the_cpu_fp32_one():
    """bf16 carries 8 mantissa bits: every element within 2% of the layer's largest value."""
    enc, dec, proj = _setup()
    codes = enc.encode(_states(8 * PS))
    k_cpu, v_cpu = FoldedDecoder(dec, enc, proj).rebuild(codes)
    fold = FoldedDecoder(dec, enc, proj).to("cuda", torch.bfloat16)
    for layer in range(L):
        k, v = fold.rebuild_layer(layer, {s: q.cuda() for s, q in codes.items()})
        for got, want in ((k, k_cpu[layer]), (v, v_cpu[layer])):
            assert (got.float().cpu() - want).abs().max() <= 0.02 * want.abs().max()
