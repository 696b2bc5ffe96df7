import math

import torch

from sgl_scd.evaluation.quality import (
    MethodScore,
    answer_kl,
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



def test_answer_kl_follows_the_oracle_answer_until_it_diverges():
    # tokens: red=1, _=2, box=3, crate=4; each later step is a distribution over 5 tokens
    def step(tok, sure=6.0):
        x = torch.zeros(5)
        x[tok] = sure
        return x

    oracle_tokens, oracle_later = [1, 2, 3], [step(2), step(3), step(0)]  # red _ box <end>
    assert answer_kl(oracle_tokens, oracle_later, oracle_tokens, oracle_later) == 0.0
    # drifts at the object: the KL of the "_" step (0) plus that of the step choosing crate; the
    # step after crate follows a prefix the oracle never saw, so it is not counted
    drift = [step(2), step(4), step(0)]
    assert math.isclose(answer_kl([1, 2, 4], drift, oracle_tokens, oracle_later),
                        kl_divergence(step(3), step(4)), rel_tol=1e-9)
    assert answer_kl([3], [step(0)], oracle_tokens, oracle_later) is None  # first token differs
    assert answer_kl([1], [], oracle_tokens, oracle_later) is None  # no later step


def test_method_score_averages_kl_answer_where_defined():
    s = MethodScore("x")
    logits = torch.tensor([0.0, 5.0])
    s.add("red box", logits, "red box", "red box", logits, 0.0)
    s.add("red crate", logits, "red box", "red box", logits, 0.4)
    s.add("box", torch.tensor([5.0, 0.0]), "red box", "red box", logits, None)
    row = s.summary()
    assert row["n_answer"] == 2 and math.isclose(row["kl_answer"], 0.2)
    assert MethodScore("y").summary()["n_answer"] == 0
