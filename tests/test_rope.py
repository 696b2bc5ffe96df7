import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sgl_scd.codec import rope


def test_derotate_inverts_rotate_exactly():
    x = torch.randn(4, 37, 3, 64, dtype=torch.float64)
    for theta in (1e4, 1e5, 1e6):
        back = rope.derotate(rope.rotate(x, theta, start=11), theta, start=11)
        # fp32 trig tables: rotation error is a few ulps of |x|
        assert (back.double() - x).abs().max() < 1e-5


def test_rotate_matches_transformers_llama(base):
    model = base.model
    t = 23
    k = torch.randn(1, 3, t, 64)  # [B, H, T, D] as transformers lays it out
    pos = torch.arange(5, 5 + t)[None]
    cos, sin = model.model.rotary_emb(k, pos)
    _, ref = apply_rotary_pos_emb(k, k, cos, sin)
    ours = rope.rotate(k[0].transpose(0, 1), rope.rope_theta(model.config), start=5)  # [T, H, D]
    assert (ours - ref[0].transpose(0, 1)).abs().max() < 1e-5


def test_rebase_between_thetas_is_a_change_of_rotation():
    x = torch.randn(9, 2, 64)
    a, b = rope.rotate(x, 1e5), rope.rotate(x, 1e6)
    assert (a - b).abs().max() > 0.1  # different bases really rotate differently
    assert (rope.rotate(rope.derotate(a, 1e5), 1e6) - b).abs().max() < 1e-5


def test_non_default_rope_is_refused():
    from types import SimpleNamespace

    try:
        rope.rope_theta(SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))
    except ValueError as e:
        assert "yarn" in str(e)
    else:
        raise AssertionError("yarn RoPE must be refused")


def test_tables_made_while_serving_work_under_autograd():
    """The cached cos/sin tables are shared by serving (inference mode) and distillation
    (autograd) in one process; a table first built in inference mode must not break backward."""
    x = torch.randn(7, 2, 8)
    with torch.inference_mode():
        rope.rotate(x, 1234.5, start=3)  # fills the cache for these positions
    y = x.clone().requires_grad_(True)
    rope.rotate(y, 1234.5, start=3).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
