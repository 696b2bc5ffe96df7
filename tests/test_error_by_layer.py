"""scripts/error_by_layer.py's swap plan, on hand-made tensors."""

from __future__ import annotations

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
