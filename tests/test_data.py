from sgl_scd.demo import data


def test_splits_are_disjoint_by_story_and_deterministic():
    splits = {s: data.load_tomi(s) for s in ("train", "dev", "test")}
    stories = {s: {it.context for it in items} for s, items in splits.items()}
    assert not stories["train"] & stories["test"]
    assert not stories["train"] & stories["dev"]
    assert not stories["dev"] & stories["test"]
    assert sum(len(v) for v in splits.values()) == 5993  # every ToMi item lands in one split
    assert [it.uid for it in data.load_tomi("test")[:20]] == [it.uid for it in splits["test"][:20]]


def test_items_have_question_and_answer_in_story():
    for it in data.load_tomi("test")[:50]:
        assert it.question.endswith("?")
        assert it.answer in it.context  # ToMi answers are locations named in the story


def test_hitom_splits_share_no_story_and_span_the_same_lengths():
    ev, cal = data.load_hitom("eval"), data.load_hitom("calib")
    assert len(ev) == len(cal) == 300  # 120 stories x 5 questions, alternating by length rank
    assert not {it.context for it in ev} & {it.context for it in cal}
    assert abs(len(ev[0].context) - len(cal[0].context)) < 0.1 * len(ev[0].context)


def test_hitom_is_longer(base):
    tomi = max(len(data.prompt_ids(base.tokenizer, it)) for it in data.load_tomi("test")[:50])
    hitom = len(data.prompt_ids(base.tokenizer, data.load_hitom()[0]))
    assert hitom > 3 * tomi


def test_prompt_ends_with_generation_header(base):
    ids = data.prompt_ids(base.tokenizer, data.load_tomi("test")[0])
    assert base.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_unknown_split_is_named():
    try:
        data.load_tomi("validation")
    except ValueError as e:
        assert "validation" in str(e)
    else:
        raise AssertionError
