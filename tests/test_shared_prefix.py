"""scripts/bench_shared_prefix.py without a model: the dev gate choice and the shared-prefix split."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sgl_scd.demo.data import SYSTEM_PROMPT, QAItem, prompt_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bsp():
    spec = importlib.util.spec_from_file_location("bsp", ROOT / "scripts" / "bench_shared_prefix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_gate_is_the_smallest_threshold_reaching_the_target(bsp):
    # 10 items: the wrong answers all come with small margins (< 0.2), as near-ties do
    margins = [(0.05, False), (0.1, False), (0.15, True), (0.3, True), (0.5, True), (0.6, True), (0.7, True),
               (0.8, True), (0.9, True), (0.95, True)]
    gate = bsp.choose_gate(margins, 0.98)
    assert gate["reached"] and gate["min_margin"] == 0.15  # prefilling the two wrong ones (and nothing more)
    assert gate["same_answer"] == 1.0 and gate["prefilled"] == pytest.approx(0.2)
    assert bsp.choose_gate(margins, 0.8)["min_margin"] == 0.0  # already 0.8 ungated: gate off


def test_the_shared_prefix_is_the_common_prompt_prefix_floored_to_pages(bsp):
    class Tok:  # the chat template as one token per character: prefixes are easy to read
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [ord(c) for m in messages for c in m["content"]] + [0]

    story = "x" * 40
    fn = bsp.shared_tokens(Tok(), QAItem("a", story, "Where is A?", "box"), 16)
    ids = prompt_ids(Tok(), QAItem("b", story, "Where is B?", "box"))
    common = len(SYSTEM_PROMPT + story + "\nWhere is ")  # then "A" vs "B"
    n = fn(None, ids)
    assert n % 16 == 0 and common - 16 < n <= common


def test_the_gate_replay_keeps_a_sure_rebuild_and_serves_the_prefill_on_a_near_tie(bsp):
    """scd_gate read off scd's and the oracle's outputs of the same item decides as the serving gate
    does (runtime.prefill_on_kv): top-1 minus top-2 probability of the rebuilt first token against
    min_margin. (On the quick-lora adapter, 15 ToMi test items, the replay and scd_method(min_margin=0.55)
    gave the same KL, same answer and prefilled share.)"""
    import torch

    from sgl_scd.hf.runtime import Continuation

    def out(probs, text, forward_s):
        return Continuation(first_logits=torch.tensor(probs).log(), tokens=[1], text=text, forward_s=forward_s,
                            timings={"rebuild_s": 0.01, "tokens": 32})

    seen, replay = bsp.gate_replay(0.3)
    record = bsp.recorded
    p = object()
    record(seen, "oracle", lambda _: out([0.6, 0.4], "box", 1.0))(p)
    record(seen, "scd", lambda _: out([0.7, 0.2, 0.1], "box", 0.2))(p)  # margin 0.5 >= 0.3: kept
    assert replay(p) is seen["scd"][1]
    record(seen, "scd", lambda _: out([0.5, 0.4, 0.1], "bag", 0.2))(p)  # margin 0.1: the prefill is served
    gated = replay(p)
    assert gated.text == "box" and gated.fell_back and gated.forward_s == pytest.approx(1.2)
    assert gated.timings == {"rebuild_s": 0.01, "tokens": 32}  # the rebuild was paid before the prefill
    with pytest.raises(RuntimeError, match="same item"):  # the scd output of another item
        replay(object())


def _row(method, same, kl, payload, **kw):
    return {"set": "hitom", "split": "test", "consumer": "quick-x", "method": method, "n": 32, "f1": 0.5,
            "f1_over_oracle": 1.0, "same_answer": same, "same_answer_se": 0.05, "kl": kl, "kl_answer": 0.1,
            "top1": same, "sure_fraction": 0.1, "same_answer_sure": 1.0, "reused_fraction": 0.96,
            "payload_ratio": payload, "compute_ratio": 0.2, "prefilled": 0.0, "min_margin": None, **kw}


def test_the_report_checks_each_target_and_plots(tmp_path):
    from sgl_scd.evaluation import shared_prefix as sp

    rows = [_row("oracle", 1.0, 0.0, 0.0), _row("raw_kv_rerot", 0.6, 0.2, 1.0), _row("droidspeak_w8", 0.7, 0.1, 0.78),
            _row("scd", 0.92, 0.05, 0.24),
            _row("scd_gate", 0.99, 0.01, 0.24, prefilled=0.3, min_margin=0.3)]
    met = {c["target"]: c["met"] for c in sp.targets(rows)}
    # Hi-ToM's targets: same >= 0.90 and KL <= 0.10 (0.92, 0.05: met); KL below both rivals at a smaller
    # payload: met; the gate reaches 0.99 but prefills 30% (> 15%): not met
    assert met == {"scd same answer >= 0.9": True, "scd KL <= 0.1": True, "scd payload <= 0.25x": True,
                   "scd KL < re-rotated raw KV and every DroidSpeak width, at <= payload": True,
                   "gated same answer >= 0.98, prefilled <= 0.15": False}
    rows[3]["kl"] = 0.15  # now DroidSpeak w8 (0.10) beats SCD in KL
    assert not next(c for c in sp.targets(rows) if "DroidSpeak" in c["target"])["met"]
    md = sp.table(rows)
    assert md.count("\n") == 1 + 4 and "scd_gate (M=0.3)" in md and "| oracle |" not in md
    pv = sp.pivot(rows).splitlines()
    assert len(pv) == 3 and "scd (0.24x)" in pv[0] and "0.150 / 0.92" in pv[2] and "30% prefilled" in pv[2]
    sp.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
