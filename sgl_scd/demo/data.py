"""ToMi and Hi-ToM question answering, extracted at run time from the evals wheel.

ToMi (CC BY-NC 4.0) is used for evaluation and adapter training only and never
redistributed: `ensure_data()` downloads the evals wheel with pip (no deps) and unpacks
just the two JSONL files into the user cache.

Splits are deterministic: ToMi items are grouped by story (several questions share one
story), the unique stories are shuffled with a fixed seed, and whole stories go to
train / dev / test, so no held-out question shares a story with a training item.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from sgl_scd.settings import data_dir

EVALS_WHEEL = "evals==3.0.1.post1"
_MEMBERS = {
    "tomi.jsonl": "evals/registry/data/theory_of_mind/tomi/test.jsonl",
    "hitom.jsonl": "evals/registry/data/theory_of_mind/hitom/hitom.jsonl",
}
SPLIT_SEED = 20260
SPLIT_FRACTIONS = {"train": 0.70, "dev": 0.10, "test": 0.20}
SYSTEM_PROMPT = "Read the story and answer the question with a single word."


@dataclass(frozen=True)
class QAItem:
    """One question: `context` is the story, `question` the last sentence, `answer` the gold word."""

    uid: str
    context: str
    question: str
    answer: str

    @property
    def user_text(self) -> str:
        return f"{self.context}\n{self.question}"


def ensure_data() -> Path:
    """Download the evals wheel (once) and extract the ToMi and Hi-ToM files; return their dir."""
    out = data_dir()
    if all((out / name).exists() for name in _MEMBERS):
        return out
    out.mkdir(parents=True, exist_ok=True)
    print(f"[sgl_scd] fetching {EVALS_WHEEL} to extract ToMi/Hi-ToM into {out} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", EVALS_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("evals-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name, member in _MEMBERS.items():
                (out / name).write_bytes(zf.read(member))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _split_story(text: str) -> tuple[str, str]:
    """Split 'story... Question?' into (story, question) at the last sentence."""
    text = text.strip()
    if "\n\n" in text:  # Hi-ToM: story, blank line, question
        story, question = text.rsplit("\n\n", 1)
        return story.strip(), question.strip()
    head, sep, tail = text[:-1].rpartition(". ")
    if not sep:
        raise ValueError(f"cannot find the question in ToMi item {text[:80]!r}")
    return head + ".", tail + text[-1]


def _read_items(name: str) -> list[QAItem]:
    """One QAItem per row of the cached <name>.jsonl (uid "<name>-<row>"), story and question split."""
    rows = _read_jsonl(ensure_data() / f"{name}.jsonl")
    return [QAItem(f"{name}-{i}", *_split_story(row["input"][-1]["content"]), row["ideal"])
            for i, row in enumerate(rows)]


def load_tomi(split: str) -> list[QAItem]:
    """ToMi items of one split ('train', 'dev' or 'test'), in a fixed order."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown ToMi split {split!r}; expected one of {sorted(SPLIT_FRACTIONS)}")
    items = _read_items("tomi")
    stories = sorted({it.context for it in items})
    random.Random(SPLIT_SEED).shuffle(stories)
    n_train = int(len(stories) * SPLIT_FRACTIONS["train"])
    n_dev = int(len(stories) * SPLIT_FRACTIONS["dev"])
    bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, len(stories))}
    lo, hi = bounds[split]
    chosen = set(stories[lo:hi])
    picked = [it for it in items if it.context in chosen]
    random.Random(f"{SPLIT_SEED}-{split}").shuffle(picked)  # mix question types in any prefix
    return picked


HITOM_SPLITS = ("eval", "calib")


def load_hitom(split: str = "eval") -> list[QAItem]:
    """Hi-ToM items (5 questions per story, 120 stories), longest stories first.

    Stories ranked by length alternate between 'eval' (benchmarks) and 'calib' (calibration of
    long-prompt adapters), so both splits span the same lengths and share no story."""
    if split not in HITOM_SPLITS:
        raise ValueError(f"unknown Hi-ToM split {split!r}; expected one of {HITOM_SPLITS}")
    items = _read_items("hitom")
    stories = sorted({it.context for it in items}, key=lambda c: (-len(c), c))
    chosen = set(stories[HITOM_SPLITS.index(split) :: 2])
    items = [it for it in items if it.context in chosen]
    # Longest stories first, in a seeded order within each length bucket.
    random.Random(SPLIT_SEED).shuffle(items)
    items.sort(key=lambda it: -len(it.context))
    return items


def load_hitom_dev() -> list[QAItem]:
    """Every question of the Hi-ToM stories calibration holds out for its own dev (every 5th
    story of the calib split; calibrate.builtin_long_prompts): where shared-prefix choices are
    tuned, never on the eval split."""
    items = load_hitom("calib")
    first = list(dict.fromkeys(it.context for it in items))  # stories in the split's order
    dev = set(first[::5])
    return [it for it in items if it.context in dev]


def stories(items: list[QAItem], n: int, min_questions: int = 2) -> list[list[QAItem]]:
    """The first n stories (in the items' order) with at least min_questions questions, each
    story's questions in that order: a shared-prefix workload (one story, several questions)."""
    by_story: dict[str, list[QAItem]] = {}
    for it in items:
        by_story.setdefault(it.context, []).append(it)
    return [qs for qs in by_story.values() if len(qs) >= min_questions][:n]


def chat_messages(item: QAItem) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item.user_text}]


def prompt_ids(tokenizer, item: QAItem) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant header (generation prompt)."""
    ids = tokenizer.apply_chat_template(chat_messages(item), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def story_tokens(tokenizer, item: QAItem, page_size: int) -> int:
    """Tokens of item's prompt that every other question on its story shares, floored to whole
    pages and at most all but the last token: what a shared-prefix store holds for it (0 when the
    story fills no page)."""
    a, b = (prompt_ids(tokenizer, replace(item, question=q)) for q in ("A", "B"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return min(shared, len(prompt_ids(tokenizer, item)) - 1) // page_size * page_size


def _joined_stories(tokenizer, min_tokens: int, split: str) -> list[tuple[str, list[QAItem]]]:
    """(context, the last story's questions) of >= min_tokens prompts: consecutive distinct
    Hi-ToM stories of one split joined, the earlier ones distractors before the asked one."""
    by_story: dict[str, list[QAItem]] = {}
    for it in load_hitom(split):
        by_story.setdefault(it.context, []).append(it)
    src = list(by_story.items())

    def length(ctx: str, q: QAItem) -> int:
        return len(prompt_ids(tokenizer, QAItem("", ctx, q.question, "")))

    out, i = [], 0
    while i < len(src):
        parts = [src[i]]
        i += 1
        while i < len(src) and length("\n\n".join(c for c, _ in parts), parts[-1][1][0]) < min_tokens:
            parts.append(src[i])
            i += 1
        ctx = "\n\n".join(c for c, _ in parts)
        if length(ctx, parts[-1][1][0]) >= min_tokens:
            out.append((ctx, parts[-1][1]))
    return out


def load_long_context(tokenizer, min_tokens: int = 1024, split: str = "eval") -> list[QAItem]:
    """Prompts of >= min_tokens: consecutive distinct Hi-ToM stories of one split joined
    (distractors first), asking one question of the last story. Hi-ToM alone peaks near 600
    tokens; this is the >= 1k-token set."""
    return [QAItem(f"long-{k}", ctx, qs[0].question, qs[0].answer)
            for k, (ctx, qs) in enumerate(_joined_stories(tokenizer, min_tokens, split))]


def long_stories(tokenizer, min_tokens: int = 1024, split: str = "eval") -> list[list[QAItem]]:
    """The joined long stories as a shared-prefix workload: per joined context, every question
    of its last story (load_long_context's question first)."""
    return [[QAItem(f"long-{k}-{j}", ctx, q.question, q.answer) for j, q in enumerate(qs)]
            for k, (ctx, qs) in enumerate(_joined_stories(tokenizer, min_tokens, split))]
