"""Shared fixtures. Model tests use the real SmolLM2 (the base builds itself from the installed
wheel in ~20 s); tests needing the fine-tuned demo variants skip, naming the build command."""

from __future__ import annotations

import pytest
import torch

from sgl_scd.hf import models

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def base():
    return models.load("base")


def load_variant(name: str) -> models.LoadedModel:
    try:
        return models.load(name)
    except FileNotFoundError as e:
        pytest.skip(f"{e}")


@pytest.fixture(scope="session")
def demo_ft():
    return load_variant("demo-ft")


@pytest.fixture(scope="session")
def demo_lora():
    return load_variant("demo-lora")


@pytest.fixture(scope="session")
def small_adapter(tmp_path_factory, base, demo_ft):
    """A small SCD adapter for base -> demo-ft, calibrated here (~1.5 min on 2 cores):
    24 calibration prompts (the closed-form fit on 16 of them, the other 8 captured as codes only),
    8 held-out, 2 patch layers, 2 distillation epochs, the oracle's first 3 answer tokens supervised."""
    from sgl_scd import calibrate

    out = tmp_path_factory.mktemp("adapters") / "small"
    calibrate.main(["--consumer", "demo-ft", "--out", str(out), "--n-calib", "24", "--n-fit", "16", "--n-dev", "8",
                    "--n-eval", "0", "--n-calib-long", "0", "--n-dev-long", "0", "--patch-count", "2", "--epochs", "2",
                    "--hidden-h", "64", "--answer-tokens", "3"])
    from sgl_scd.codec.manifest import load_adapter

    return load_adapter(out, base, demo_ft)
