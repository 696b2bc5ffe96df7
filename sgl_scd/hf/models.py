"""Loading any model spec into the reference runtime (transformers, fp32, LoRA merged).

Specs accepted everywhere a model is named:
  - "base": SmolLM2-135M-Instruct (built from the installed wheel on first use, sgl_scd.demo.base);
  - "demo-ft": the main demo consumer, a full fine-tune with RoPE base 1e5 -> 1e6
    (a long-context style variant, like MistralLite is of Mistral-7B);
  - "demo-lora": the mild multi-LoRA case (peft LoRA r=16 on all linear projections);
  - "demo-hitom": a LoRA r=8 on q/v/up projections trained on Hi-ToM stories;
  - a directory: a PEFT adapter (adapter_config.json, applied on "base") or a full checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sgl_scd.codec import rope
from sgl_scd.codec.manifest import ModelIdentity, tokenizer_digest
from sgl_scd.demo.base import BUILD_HINT, base_dir, ensure_base, variant_dir
from sgl_scd.demo.finetune import VARIANTS


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the reference runtime: fp32, eval mode, LoRA merged."""

    spec: str
    model: torch.nn.Module
    tokenizer: object
    revision: str  # sha256 digest of the weights that define it (base + adapter)

    @property
    def config(self):
        return self.model.config

    def identity(self) -> ModelIdentity:
        c = self.config
        return ModelIdentity(spec=self.spec, revision=self.revision,
                             rope_theta=rope.rope_theta(c), num_layers=c.num_hidden_layers,
                             kv_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_size=c.hidden_size)

    def tokenizer_digest(self) -> str:
        return tokenizer_digest(self.tokenizer)


def weights_digest(path: Path) -> str:
    """sha256 over a checkpoint's or adapter's safetensors files (its revision identity)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve(spec: str) -> Path:
    """Directory of a model spec; raises FileNotFoundError naming the command that builds it."""
    if spec == "base":
        return ensure_base()
    if spec in VARIANTS:
        path = variant_dir(spec)
        if not (path / "DONE").exists():
            raise FileNotFoundError(f"demo variant {spec!r} is not built ({path}); {BUILD_HINT}")
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model spec {spec!r} is neither 'base', one of {sorted(VARIANTS)}, nor a directory"
        )
    return path


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


_CACHE: dict[str, LoadedModel] = {}


def load(spec: str, *, cached: bool = True) -> LoadedModel:
    """Load a model spec for inference (fp32, eval, LoRA merged). Cached per process."""
    if cached and spec in _CACHE:
        return _CACHE[spec]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec)
    tok = AutoTokenizer.from_pretrained(base_dir() if is_adapter(path) else path)
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(ensure_base(), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        revision = hashlib.sha256(
            (weights_digest(base_dir()) + weights_digest(path)).encode()
        ).hexdigest()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        revision = weights_digest(path)
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedModel(spec=spec, model=model, tokenizer=tok, revision=revision)
    if cached:
        _CACHE[spec] = loaded
    return loaded
