"""SCD on the real pair (base -> demo-ft): calibration, the manifest contract, and quality."""

import json

import pytest
import torch

from sgl_scd.codec import manifest as mf
from sgl_scd.codec import rope, wire
from sgl_scd.codec.codec import (
    CONTEXTS,
    ConsumerDecoder,
    ProducerEncoder,
    context_inputs,
    fit_slot_encoder,
    plan_slots,
)
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.demo import data
from sgl_scd.evaluation import baselines, evaluate
from sgl_scd.evaluation.methods import encode_prompt, rebuild_kv, scd_method
from sgl_scd.hf import runtime

pytestmark = pytest.mark.model


def test_scd_kl_far_below_raw_kv(base, demo_ft, small_adapter):
    """Even a small calibration (24 prompts, 2 epochs) must beat raw KV by a wide margin.
    Measured on 12 held-out items: raw_kv KL ~7 nats (the RoPE change scrambles attention),
    the small SCD adapter ~0.3-0.6. Requiring SCD < raw/5 leaves >2x margin for CPU/seed noise
    while still failing if translation is broken (broken decoders land at raw_kv's level)."""
    items = data.load_tomi("test")[:12]
    rows = {r["method"]: r for r in evaluate.evaluate(
        base, demo_ft, items, {"raw_kv": evaluate.raw_kv, "scd": scd_method(small_adapter)}, desc="it")}
    assert rows["raw_kv"]["kl"] > 2.0  # the pair really shows the problem
    assert rows["scd"]["kl"] < rows["raw_kv"]["kl"] / 5
    assert rows["scd"]["top1"] > rows["raw_kv"]["top1"]


def test_scd_tail_prefills_the_last_tokens(base, demo_ft, small_adapter):
    item = data.load_tomi("test")[0]
    p = evaluate.PairItem(base, demo_ft, item, data.prompt_ids(base.tokenizer, item))
    out = scd_method(small_adapter, tail=16)(p)
    assert out.timings["tokens"] == len(p.ids) - 16  # rebuilt from codes; the rest prefilled
    assert scd_method(small_adapter)(p).timings["tokens"] == len(p.ids) - 1
    with pytest.raises(ValueError, match="-1"):
        scd_method(small_adapter, tail=-1)


def test_manifest_contract(base, demo_ft, demo_lora, small_adapter, tmp_path):
    man = small_adapter.manifest
    assert man["producer"]["revision"] == base.revision and man["consumer"]["revision"] == demo_ft.revision
    assert man["codec"]["payload_ratio"] < 0.25
    assert len(man["codec"]["patch_layers"]) <= 2
    assert (man["calibration"]["n_calib"], man["calibration"]["n_fit"]) == (24, 16)  # distilled on all 24
    # bit budgets per slot: 3 bits per K/V dim (192), 4 per hidden dim (576) of a patch input
    bits = {name.rsplit(".", 1)[1]: v["bits"] for name, v in man["codec"]["slots"].items()}
    assert man["codec"]["patch_bits_per_dim"] == 4.0
    assert bits["k"] <= 3 * 192 and bits["v"] <= 3 * 192 and 0 < bits["h"] <= 4 * 576
    path = tmp_path / "a"
    mf.save_adapter(path, man, small_adapter.encoder, small_adapter.decoder)
    with pytest.raises(mf.ManifestMismatch, match="consumer.revision"):
        mf.load_adapter(path, base, demo_lora)  # calibrated for demo-ft, not the LoRA
    with pytest.raises(mf.ManifestMismatch, match="consumer.rope_theta|consumer.revision"):
        mf.load_adapter(path, base, base)
    bad = dict(man, codec=dict(man["codec"], version=99))
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(mf.ManifestMismatch, match="codec.version"):
        mf.load_adapter(path)


def test_wire_roundtrip_rebuild_equals_direct(base, demo_ft, small_adapter):
    ids = data.prompt_ids(base.tokenizer, data.load_tomi("test")[3])
    cap = runtime.capture_prefill(base.model, ids[:-1])
    blobs = encode_prompt(small_adapter, cap)
    k, v = rebuild_kv(small_adapter, demo_ft.model, blobs)
    with torch.inference_mode():
        z = small_adapter.encoder.dequantize(small_adapter.encoder.encode(cap))
        k2, v2 = small_adapter.decoder.rebuild(demo_ft.model, z)
    # Serving folds dequantization and the consumer's k/v projections into the decoder (fold.py):
    # the same maps composed in float64, so only fp32 rounding separates it from the trainable form.
    scale = k2.abs().max()
    assert (k - k2).abs().max() < 1e-4 * scale and (v - v2).abs().max() < 1e-4 * v2.abs().max()
    with pytest.raises(wire.WireError):
        rebuild_kv(small_adapter, demo_ft.model, [blobs[0][:-5]] + blobs[1:])


@pytest.mark.parametrize("context", [*CONTEXTS, "kv+hall@17"])
def test_fold_matches_trainable_form_for_every_decoder_shape(demo_ft, context):
    """The fold stacks translators that read the same codes into one matmul and carries residual
    MLPs on K/V (--hidden-kv) and patch slots: with random weights everywhere (the MLPs' output
    layers too, which calibration starts at 0) it must still equal the trainable form. Same
    fp32-rounding tolerance as above."""
    cfg = demo_ft.model.config
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    torch.manual_seed(0)
    slots = plan_slots(cfg.num_hidden_layers, [3, 17])
    encoder = ProducerEncoder({s: fit_slot_encoder(torch.randn(64, cfg.hidden_size if s.kind == "h" else kv_dim), 24)
                               for s in slots}, 1e5)
    dims = {s: (e.rank, cfg.hidden_size if s.kind == "h" else kv_dim) for s, e in encoder.slots.items()}
    decoder = ConsumerDecoder(dims, {"k": 8, "v": 8, "h": 8}, rope.rope_theta(cfg), cfg.num_key_value_heads,
                              cfg.head_dim, context_inputs(slots, context))
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.1)
    codes = {s: e.encode(torch.randn(9, e.mean.shape[0])) for s, e in encoder.slots.items()}
    k, v = FoldedDecoder(decoder, encoder, demo_ft.model).rebuild(codes, start=5)
    with torch.no_grad():
        k2, v2 = decoder.rebuild(demo_ft.model, encoder.dequantize(codes), start=5)
    assert (k - k2).abs().max() < 1e-4 * k2.abs().max() and (v - v2).abs().max() < 1e-4 * v2.abs().max()


def test_droidspeak_full_window_is_the_consumer_prefill(base, demo_ft):
    """Recomputing every layer from the embeddings must reproduce the consumer's own KV."""
    ids = data.prompt_ids(base.tokenizer, data.load_tomi("test")[0])
    own = runtime.capture_prefill(demo_ft.model, ids, hidden=False, residual=True)
    k, v = baselines.recompute_window(demo_ft.model, own.resid[0], 0, own.k.shape[0])
    assert (k - own.k).abs().max() < 1e-3 and (v - own.v).abs().max() < 1e-3


def test_kivi4_error_is_small_and_payload_quarter():
    k, v = torch.randn(30, 70, 3, 64), torch.randn(30, 70, 3, 64)
    kh, vh, per_tok = baselines.kivi_quantize(k, v, 4)
    assert (kh - k).pow(2).mean() / k.pow(2).mean() < 0.02  # 4-bit min/max over 32 values
    assert (vh - v).pow(2).mean() / v.pow(2).mean() < 0.02
    assert 0.25 < per_tok / (30 * 2 * 192 * 2) < 0.35  # 4 bits + fp16 scales/zeros


def test_kivi4_constant_groups_stay_finite():
    """A group whose values are all equal has zero range: reconstruction must be exact, not NaN."""
    k = torch.ones(2, 40, 3, 64)
    v = torch.zeros(2, 40, 3, 64)
    kh, vh, _ = baselines.kivi_quantize(k, v, 4)
    assert torch.isfinite(kh).all() and torch.isfinite(vh).all()
    assert torch.allclose(kh, k, atol=1e-3) and torch.allclose(vh, v)


def test_answer_supervision_matches_the_oracle_with_its_own_kv(demo_ft):
    """The teacher-forced answer capture is consistent with the serving path: its tokens are the
    oracle's greedy answer, and the distillation forward (runtime.logits_with_kv) given the
    consumer's own K/V for the prompt reproduces the oracle's log-probs after each answer token.
    Tolerance 1e-2 nats: the log-probs are stored in fp16; a wrong position or K/V offset gives
    KL of order 1."""
    from sgl_scd.calibrate import oracle_answer
    from sgl_scd.calibration.distill import kl_rows

    ids = data.prompt_ids(demo_ft.tokenizer, data.load_tomi("test")[3])
    n = len(ids)
    cap = runtime.capture_prefill(demo_ft.model, ids, hidden=False)
    ans = oracle_answer(demo_ft, ids, cap, 3)
    assert 1 <= len(ans["answer"]) <= 3
    assert ans["answer"] == runtime.continue_from_kv(demo_ft.model, demo_ft.tokenizer, ids).tokens[:3]
    with torch.no_grad():
        (logits,) = runtime.logits_with_kv(demo_ft.model, [ids + ans["answer"]],
                                           [torch.cat([cap.k, ans["answer_k"].to(cap.k.dtype)], 1)],
                                           [torch.cat([cap.v, ans["answer_v"].to(cap.v.dtype)], 1)],
                                           [list(range(n, n + len(ans["answer"])))])
    assert float(kl_rows(ans["answer_logp"], logits).max()) < 1e-2


def test_distill_trains_all_but_frozen_translators(base, demo_ft, small_adapter):
    """distill(lr_scale={slot: 0}) leaves that slot's translator bitwise at its start and trains the
    rest. The loss is the dev score itself (dev = train, all weight on the last position) and one
    small full-batch step lowers it, so the trained state is kept (a kept start would make frozen
    and untrained look alike)."""
    import copy
    import random

    from sgl_scd.calibrate import capture_pair, distill_samples
    from sgl_scd.calibration import distill

    enc = small_adapter.encoder
    dec = copy.deepcopy(small_adapter.decoder).requires_grad_(True)
    rng = random.Random(0)
    caps = [capture_pair(base, demo_ft, data.prompt_ids(base.tokenizer, it), 8, rng, list(enc.slots))
            for it in data.load_tomi("train")[:4]]
    samples = distill_samples(enc, caps)
    frozen = next(s for s in dec.slots if s.kind == "h")
    prefix = f"translators.{frozen.name.replace('.', '_')}."
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    result = distill.distill(demo_ft.model, dec, samples, samples, epochs=1, lr=3e-5, batch=4, delta_rank=4,
                             last_share=1.0, lr_scale={frozen: 0.0}, log=lambda *_: None)
    after = dec.state_dict()
    assert result["epoch"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith(prefix))
