"""Seeded, CPU-friendly fine-tuning that builds the demo consumers from the base model.

Three recipes (see VARIANTS), one base, consumers that differ in form and data:
  - demo-lora: peft LoRA r=16 on all 7 linear projections, 400 ToMi train items, 1 epoch,
    lr 3e-4, batch 8, loss on the answer only. The mild case: what multi-LoRA serving looks like.
  - demo-ft: the RoPE base is moved from 1e5 to 1e6 (a long-context style variant) and the whole
    model is fine-tuned: 640 items, 1 epoch, lr 1e-4, loss on the answer plus a lighter LM loss
    on the prompt so attention re-adapts to the new RoPE. The base's raw KV is useless to it.
  - demo-hitom: peft LoRA r=8 on q_proj, v_proj and up_proj only, trained on 96 Hi-ToM
    calibration-split stories (long, multi-agent prompts), lr 5e-4, batch 4.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_scd.demo.base import ensure_base
from sgl_scd.demo.data import load_hitom, load_tomi, prompt_ids


@dataclass(frozen=True)
class Recipe:
    kind: str  # "lora" or "full"
    n_train: int
    lr: float
    batch_size: int = 8
    epochs: int = 1
    seed: int = 0
    rope_theta: float | None = None  # new RoPE base (full fine-tunes only)
    prompt_loss_weight: float = 0.0  # weight of the LM loss on prompt tokens
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    data: str = "tomi"  # "tomi" (ToMi train) or "hitom" (the shortest Hi-ToM calib items)


VARIANTS = {
    "demo-lora": Recipe(kind="lora", n_train=400, lr=3e-4),
    "demo-ft": Recipe(kind="full", n_train=640, lr=1e-4, rope_theta=1e6, prompt_loss_weight=0.2),
    "demo-hitom": Recipe(kind="lora", n_train=96, lr=5e-4, batch_size=4, lora_r=8, lora_alpha=16,
                         lora_targets=("q_proj", "v_proj", "up_proj"), data="hitom"),
    # `make demo`'s consumers: the same three forms in fewer steps (~10 min on 2 cores for all three)
    "quick-ft": Recipe(kind="full", n_train=192, lr=2e-4, rope_theta=1e6, prompt_loss_weight=0.2),
    "quick-lora": Recipe(kind="lora", n_train=128, lr=5e-4),
    "quick-hitom": Recipe(kind="lora", n_train=32, lr=1e-3, batch_size=4, lora_r=8, lora_alpha=16,
                          lora_targets=("q_proj", "v_proj", "up_proj"), data="hitom"),
    # the test suite's consumers, built in ~1 min on 2 cores: the same two forms, a few steps each
    "ci-ft": Recipe(kind="full", n_train=24, lr=1e-4, batch_size=4, rope_theta=1e6, prompt_loss_weight=0.2),
    "ci-lora": Recipe(kind="lora", n_train=16, lr=1e-3, batch_size=4, lora_r=4, lora_alpha=8),
}


def training_example(tokenizer, item) -> tuple[list[int], int]:
    """(token ids of prompt + answer + <|im_end|>, prompt length)."""
    prompt = prompt_ids(tokenizer, item)
    answer = tokenizer.encode(item.answer + "<|im_end|>", add_special_tokens=False)
    return prompt + answer, len(prompt)


def _batch_loss(model, batch, pad_id: int, prompt_w: float) -> torch.Tensor:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    weight = torch.zeros((len(batch), width))
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        weight[i, 1:n_prompt] = prompt_w  # predicting prompt tokens 1..n_prompt-1
        weight[i, n_prompt : len(ids)] = 1.0  # predicting the answer and <|im_end|>
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]  # [B, W-1, V]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(len(batch), -1)  # [B, W-1]
    w = weight[:, 1:]
    return (nll * w).sum() / w.sum()


def train(recipe: Recipe, out: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    torch.manual_seed(recipe.seed)
    base = ensure_base()
    tok = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    if recipe.rope_theta is not None:  # the rotary tables are built from the config at init
        config.rope_parameters["rope_theta"] = recipe.rope_theta
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    if recipe.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.lora_targets),
                       lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
    model.train()
    items = load_tomi("train")[: recipe.n_train] if recipe.data == "tomi" else load_hitom("calib")[-recipe.n_train :]
    examples = [training_example(tok, it) for it in items]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps = recipe.epochs * ((len(examples) + recipe.batch_size - 1) // recipe.batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    rng = random.Random(recipe.seed)
    losses = []
    t0 = time.time()
    bar = tqdm(total=steps, desc=f"fine-tuning {out.name}", file=sys.stderr)
    for _ in range(recipe.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order), recipe.batch_size):
            batch = [examples[i] for i in order[s : s + recipe.batch_size]]
            loss = _batch_loss(model, batch, tok.pad_token_id, recipe.prompt_loss_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if recipe.kind == "full":
        tok.save_pretrained(out)
    return {"recipe": asdict(recipe), "train_s": time.time() - t0, "steps": steps,
            "first_loss": losses[0], "last_loss": sum(losses[-5:]) / min(5, len(losses))}


def build_variant(name: str, out: Path) -> None:
    if name not in VARIANTS:
        raise ValueError(f"unknown demo variant {name!r}; expected one of {sorted(VARIANTS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = train(VARIANTS[name], out)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(f"[sgl_scd] {name}: {json.dumps(report)}", file=sys.stderr)
