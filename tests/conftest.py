"""Shared fixtures. Model tests use the real SmolLM2 and consumers fine-tuned from it here, so a
fresh machine runs the SCD path end to end: the base builds from the installed wheel (~20 s),
the test consumers (ci-ft: full fine-tune with RoPE base 1e6; ci-lora: LoRA r=4) from a few
steps each (~1 min, cached in the user cache like the demo variants), and one small encoder with
both consumers' decoders is calibrated per session (~3 min on 2 cores)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from sgl_scd.demo import finetune
from sgl_scd.demo.base import variant_dir
from sgl_scd.hf import models

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # the machine has 2 cores

# A small calibration: 24 prompts (the closed-form fit on 16, the other 8 captured as codes
# only), 8 held-out, 2 distillation epochs, the oracle's first 3 answer tokens supervised.
SMALL = ["--n-calib", "24", "--n-fit", "16", "--n-dev", "8", "--n-eval", "0", "--n-calib-long", "0",
         "--n-dev-long", "0", "--epochs", "2", "--hidden-h", "64", "--answer-tokens", "3"]


def build_test_variant(name: str) -> models.LoadedModel:
    path = variant_dir(name)
    if not (path / "DONE").exists():
        finetune.build_variant(name, path)
        (path / "DONE").write_text(json.dumps({"built": time.time()}))
    return models.load(name)


@pytest.fixture(scope="session")
def base():
    return models.load("base")


@pytest.fixture(scope="session")
def ci_ft(base):
    return build_test_variant("ci-ft")


@pytest.fixture(scope="session")
def ci_lora(base):
    return build_test_variant("ci-lora")


@pytest.fixture(scope="session")
def adapters_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def small_encoder(adapters_root, ci_ft):
    """An encoder whose 2 patch layers are ranked for ci-ft, with the small recipe."""
    from sgl_scd import calibrate
    from sgl_scd.codec.manifest import load_encoder

    out = adapters_root / "ci-encoder"
    calibrate.main(["--consumer", "ci-ft", "--encoder-only", "--out", str(out), "--patch-count", "2", *SMALL])
    return load_encoder(out)


def _calibrated(adapters_root, encoder, consumer: str):
    from sgl_scd import calibrate
    from sgl_scd.codec.manifest import load_adapter

    out = adapters_root / consumer
    calibrate.main(["--consumer", consumer, "--encoder", str(encoder.path), "--out", str(out), *SMALL])
    return load_adapter(out)


@pytest.fixture(scope="session")
def small_adapter(adapters_root, small_encoder, ci_ft):
    """ci-ft's decoders against the small encoder."""
    return _calibrated(adapters_root, small_encoder, "ci-ft")


@pytest.fixture(scope="session")
def lora_adapter(adapters_root, small_encoder, ci_lora):
    """ci-lora's decoders against the same encoder: a second consumer of one code set."""
    return _calibrated(adapters_root, small_encoder, "ci-lora")
