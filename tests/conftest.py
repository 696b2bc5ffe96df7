"""Shared fixtures. Model tests use the real SmolLM2 (the base builds itself from the installed
wheel in ~20 s); tests needing the fine-tuned demo variants skip, naming the build command."""

from __future__ import annotations

import pytest
import torch

from sgl_scd import models

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
