import math

import torch

from sgl_scd.quality import (
    MethodScore,
    exact_match,
    kl_divergence,
    normalize_answer,
    token_f1,
    top2_margin,
)


def test_squad_normalization():
    assert normalize_answer("The  Pantry!") == "pantry"
    assert normalize_answer("green_drawer") == "green drawer"


def test_f1_and_em():
    assert token_f1("pantry", "pantry") == 1.0
    # "boots are in pantry" after normalization: precision 1/4, recall 1
    assert token_f1("The boots are in the pantry.", "pantry") == 2 * (1 / 4) * 1 / (1 / 4 + 1)
    assert token_f1("bathtub", "pantry") == 0.0
    assert exact_match("the Pantry", "pantry") == 1.0
    assert exact_match("in the pantry", "pantry") == 0.0


def test_kl_properties():
    a = torch.randn(100)
    assert kl_divergence(a, a) == 0.0
    assert kl_divergence(a, a + 3.0) < 1e-9  # logits are shift-invariant
    b = torch.randn(100)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert math.isclose(kl_divergence(a, b), float((p * (p / q).log()).sum()), rel_tol=1e-9)


def test_top2_margin():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    assert math.isclose(top2_margin(logits), 0.3, abs_tol=1e-6)
    assert top2_margin(torch.zeros(5)) == 0.0  # an exact tie


def test_method_score_summary():
    s = MethodScore("x")
    logits = torch.tensor([0.0, 5.0])
    s.add("pantry", logits, "pantry", "pantry", logits)
    s.add("box", torch.tensor([5.0, 0.0]), "pantry", "pantry", logits)
    row = s.summary()
    assert row["n"] == 2 and row["f1"] == 0.5 and row["same_answer"] == 0.5 and row["top1"] == 0.5
    assert row["kl"] > 0


def test_method_score_kl_second_only_where_the_first_token_agrees():
    s = MethodScore("x")
    first = torch.tensor([0.0, 5.0])
    oracle_second, drifted = torch.tensor([4.0, 0.0]), torch.tensor([0.0, 4.0])
    s.add("red box", first, "red box", "red box", first, oracle_second, oracle_second)  # agrees: KL 0
    s.add("red crate", first, "red box", "red box", first, drifted, oracle_second)  # drifts after token 1
    s.add("box", torch.tensor([5.0, 0.0]), "red box", "red box", first, drifted, oracle_second)  # token 1 differs
    s.add("red", first, "red", "red", first)  # no second token logits: not counted
    row = s.summary()
    assert row["n_second"] == 2  # the third item's first token differs, the fourth has none
    assert math.isclose(row["kl_second"], kl_divergence(oracle_second, drifted) / 2, rel_tol=1e-9)
    assert MethodScore("y").summary()["n_second"] == 0
