"""scripts/error_by_layer.py's swap plan, on hand-made tensors."""

from __future__ import annotations

import re

import pytest
import torch
from script_loader import load_script


def test_swaps_cover_every_layer_and_the_groups():
    ebl = load_script("error_by_layer")
    table = ebl.swaps(4, [2])
    assert table["none"] == ([], "kv") and table["all K"] == ([0, 1, 2, 3], "k")
    assert table["reuse layers"][0] == [0, 1, 3] and table["patch layers"][0] == [2]
    assert table[ebl.VIA_WIRE] == ([2], "kv") and [table[f"L{i:02d}"][0] for i in range(4)] == [[0], [1], [2], [3]]
    assert ebl.VIA_WIRE not in ebl.swaps(4, [])  # a reuse-only adapter sends no h codes


def test_swapped_replaces_only_the_named_layers():
    ebl = load_script("error_by_layer")
    rebuilt, own = torch.zeros(3, 5, 1, 2), torch.ones(3, 5, 1, 2)
    out = ebl.swapped(rebuilt, own, [1])
    assert out[1].eq(1).all() and out[[0, 2]].eq(0).all() and rebuilt.eq(0).all()  # the input is left alone


def test_predictability_feature_sets_parse_and_refuse_bad_layers():
    pp = load_script("patch_predictability")
    sets = pp.parse_features("23; 22-24 ;18,23+prev", 30)
    assert sets == {"23": ([23], False), "22-24": ([22, 23, 24], False), "18,23+prev": ([18, 23], True)}
    for bad in ("23-31", "x", "-1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            pp.parse_features(bad, 30)


def test_predictability_features_stack_layers_and_the_previous_token():
    pp = load_script("patch_predictability")
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # [layers, T, d]
    x = pp.features(h, [0, 1], prev=True)
    assert x.shape == (3, 8)
    assert torch.equal(x[1, :4], torch.cat([h[0, 1], h[1, 1]])) and torch.equal(x[1, 4:], x[0, :4])
    assert torch.equal(x[0, 4:], x[0, :4])  # the first token has no predecessor: it repeats itself
