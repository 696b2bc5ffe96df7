"""The reference runtime's two directions on the real SmolLM2 (fp32)."""

import pytest
import torch

from sgl_scd.demo import data
from sgl_scd.evaluation import quality
from sgl_scd.hf import runtime


@pytest.fixture(scope="module")
def prompt(base):
    return data.prompt_ids(base.tokenizer, data.load_tomi("test")[0])


def test_capture_shapes(base, prompt):
    cap = runtime.capture_prefill(base.model, prompt)
    cfg = base.config
    assert cap.k.shape == (cfg.num_hidden_layers, len(prompt), cfg.num_key_value_heads, cfg.head_dim)
    assert cap.v.shape == cap.k.shape
    assert cap.h_in.shape == (cfg.num_hidden_layers, len(prompt), cfg.hidden_size)


@pytest.mark.parametrize("covered", ["all_but_last", "half"])
def test_injecting_own_kv_is_exact(base, prompt, covered):
    """Own captured KV + continue == plain prefill: logits within 1e-4 (fp32; the only difference
    is the attention's reduction order) and the same greedy answer."""
    cap = runtime.capture_prefill(base.model, prompt, hidden=False)
    t = len(prompt) - 1 if covered == "all_but_last" else len(prompt) // 2
    plain = runtime.continue_from_kv(base.model, base.tokenizer, prompt)
    injected = runtime.continue_from_kv(base.model, base.tokenizer, prompt, cap.k[:, :t], cap.v[:, :t])
    assert (plain.first_logits - injected.first_logits).abs().max().item() <= 1e-4
    assert injected.tokens == plain.tokens and injected.text == plain.text
    assert len(plain.tokens) > 0


def test_min_margin_gate_drops_near_tie_kv_for_a_prefill(base, prompt):
    """The serving gate: below min_margin the given K/V are dropped and the prompt prefilled
    (same logits and answer as the plain prefill); at or above it they are used. Own KV give the
    plain prefill's margin m (to 1e-4), so m -/+ 0.01 sits on either side of the threshold."""
    cap = runtime.capture_prefill(base.model, prompt, hidden=False)
    t = len(prompt) - 1
    plain = runtime.continue_from_kv(base.model, base.tokenizer, prompt)
    m = quality.top2_margin(plain.first_logits)
    kept = runtime.continue_from_kv(base.model, base.tokenizer, prompt, cap.k[:, :t], cap.v[:, :t],
                                    min_margin=max(0.0, m - 0.01))
    assert not kept.fell_back
    zeros = torch.zeros_like(cap.k[:, :t])  # a wrong cache: its answer distribution differs
    used = runtime.continue_from_kv(base.model, base.tokenizer, prompt, zeros, zeros)
    assert not used.fell_back and (used.first_logits - plain.first_logits).abs().max() > 1.0
    gated = runtime.continue_from_kv(base.model, base.tokenizer, prompt, zeros, zeros, min_margin=1.0)
    assert gated.fell_back and gated.tokens == plain.tokens
    assert (gated.first_logits - plain.first_logits).abs().max() <= 1e-4
    assert gated.forward_s > plain.forward_s * 0.5  # both forwards are counted
    fell = runtime.continue_from_kv(base.model, base.tokenizer, prompt, cap.k[:, :t], cap.v[:, :t],
                                    min_margin=min(1.0, m + 0.01))
    assert fell.fell_back
    with pytest.raises(ValueError, match="got 1.5"):
        runtime.continue_from_kv(base.model, base.tokenizer, prompt, zeros, zeros, min_margin=1.5)


def test_project_kv_recomputes_captured_kv(base, prompt):
    cap = runtime.capture_prefill(base.model, prompt)
    for layer in (0, 14, 29):
        k, v = runtime.project_kv(base.model, layer, cap.h_in[layer])
        assert (k - cap.k[layer]).abs().max() < 1e-4
        assert (v - cap.v[layer]).abs().max() < 1e-4


def test_derotated_keys_are_position_free(base):
    """The same token at two positions has (almost) the same de-rotated key at layer 0."""
    tok = base.tokenizer.encode(" apple", add_special_tokens=False)
    ids = tok * 6
    cap = runtime.capture_prefill(base.model, ids, hidden=False)
    k0 = cap.k_derotated()[0]  # [T, H, D]; layer 0 sees only the token's own embedding in K
    assert (k0[1] - k0[5]).abs().max() < 1e-3
    assert (cap.k[0, 1] - cap.k[0, 5]).abs().max() > 0.1  # while rotated keys differ


def test_continue_refuses_kv_covering_the_whole_prompt(base, prompt):
    cap = runtime.capture_prefill(base.model, prompt, hidden=False)
    with pytest.raises(ValueError, match="at least the last prompt token"):
        runtime.continue_from_kv(base.model, base.tokenizer, prompt, cap.k, cap.v)


def test_build_cache_names_bad_shape(base):
    with pytest.raises(ValueError, match=r"L=30"):
        runtime.build_cache(base.model, torch.zeros(2, 3, 3, 64), torch.zeros(2, 3, 3, 64))


def test_logits_with_kv_batched_equals_one_by_one(base, prompt):
    """Right-padded batch == each prompt alone (causal attention keeps padding out), and its own
    KV gives its own prefill's logits; 1e-4: fp32 with a different reduction order."""
    short = prompt[:40]
    caps = [runtime.capture_prefill(base.model, p, hidden=False, logits_at=pos)
            for p, pos in ((prompt, [5, len(prompt) - 1]), (short, [39]))]
    ids, pos = [prompt, short], [[5, len(prompt) - 1], [39]]
    batched = runtime.logits_with_kv(base.model, ids, [c.k for c in caps], [c.v for c in caps], pos)
    for i, c in enumerate(caps):
        alone = runtime.logits_with_kv(base.model, ids[i:i + 1], [c.k], [c.v], pos[i:i + 1])[0]
        assert (batched[i] - alone).abs().max().item() <= 1e-4
        assert (batched[i] - c.sel_logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="prompt 1: K/V cover 39 tokens, ids have 40"):
        runtime.logits_with_kv(base.model, ids, [caps[0].k, caps[1].k[:, :39]], [caps[0].v, caps[1].v[:, :39]], pos)


def test_logits_with_kv_given_prefix_equals_cache_then_prefill(base, prompt):
    """given=[g]: the first g tokens read the given (here perturbed) K/V and the rest the model's
    own, exactly as a cache of those g tokens followed by a prefill of the rest (the shared-prefix
    serving path); batched with another g; 1e-4: fp32 with a different reduction order."""
    cap = runtime.capture_prefill(base.model, prompt, hidden=False)
    g = torch.Generator().manual_seed(0)
    k = cap.k + 0.3 * torch.randn(cap.k.shape, generator=g)
    v = cap.v + 0.3 * torch.randn(cap.v.shape, generator=g)
    n, tail = len(prompt), list(range(len(prompt) - 8, len(prompt)))
    got = runtime.logits_with_kv(base.model, [prompt, prompt], [k, k], [v, v], [tail, tail], given=[n - 8, 16])
    for out, r in zip(got, (n - 8, 16)):
        cache = runtime.build_cache(base.model, k[:, :r], v[:, :r])
        with torch.no_grad():
            ref = base.model(input_ids=torch.tensor([prompt[r:]]), position_ids=torch.tensor([list(range(r, n))]),
                             past_key_values=cache, use_cache=True).logits[0, -8:].float()
        assert (out - ref).abs().max().item() <= 1e-4
    full = runtime.logits_with_kv(base.model, [prompt], [k], [v], [tail])[0]
    assert (got[1] - full).abs().max().item() > 1e-2  # the perturbation is visible where it is read


def test_story_tokens_is_the_page_floored_story(base):
    """Two questions on one story share exactly story_tokens' whole pages (the prompts differ
    inside the next page or at its start)."""
    qs = data.stories(data.load_tomi("test"), 1)[0]
    a, b = (data.prompt_ids(base.tokenizer, q) for q in qs[:2])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    r = data.story_tokens(base.tokenizer, qs[0], 16)
    assert r % 16 == 0 and 0 < r <= shared < r + 16 + 3  # +3: the two questions may share a few words
    assert r == data.story_tokens(base.tokenizer, qs[1], 16)


def test_joined_long_stories_are_distinct_stories_with_the_last_ones_questions(base):
    """Each joined prompt is >= 1k tokens of distinct Hi-ToM stories (distractors first); its
    shared-prefix questions are every question of the last story, all on the same context."""
    by_story: dict[str, list] = {}
    for it in data.load_hitom("eval"):
        by_story.setdefault(it.context, []).append(it)
    groups = data.long_stories(base.tokenizer)
    assert len(groups) >= 12  # enough contexts for a shared-prefix benchmark (eval has 60 stories)
    for qs in groups[:4]:
        parts = qs[0].context.split("\n\n")
        stories = [c for c in by_story if c in qs[0].context]
        assert len(stories) >= 2 and len(set(stories)) == len(stories)  # no story repeated
        last = next(c for c in stories if qs[0].context.endswith(c))
        assert [q.question for q in qs] == [q.question for q in by_story[last]]
        assert {q.context for q in qs} == {qs[0].context} and len(parts) >= 2
        assert len(data.prompt_ids(base.tokenizer, qs[0])) >= 1024
    first = data.load_long_context(base.tokenizer)[0]
    assert (first.context, first.question) == (groups[0][0].context, groups[0][0].question)
