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
