"""Shared fixtures: a real tokenizer, a tiny random Llama, and the shared QA data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """Return the shared QA data folder: ``$GRADSENTRY_SHARED_DATA``, else ``../shared/data``."""
    configured = os.environ.get("GRADSENTRY_SHARED_DATA")
    path = Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def qa_data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared QA data not found: set GRADSENTRY_SHARED_DATA or provide ../shared/data")
    return path


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    """The embedded SmolLM2 model as a safetensors folder (converted once per cache)."""
    from gradsentry_dagster.models import ModelLoadError, embedded_model_dir

    try:
        return embedded_model_dir()
    except ModelLoadError as error:
        pytest.skip(f"embedded model unavailable: {error}")


@pytest.fixture(scope="session")
def tokenizer(embedded_model_path):
    """SmolLM2's real tokenizer (49,152 tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def make_tiny_llama(vocab_size: int, seed: int = 0, tied: bool = True, hidden_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A randomly initialised 2-layer Llama with tied embeddings and SmolLM2's vocabulary."""
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """The tiny model and tokenizer saved as a local safetensors folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A real Dagster instance in a temporary DAGSTER_HOME, with storage beside it."""
    from dagster import DagsterInstance

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GRADSENTRY_STORAGE", str(tmp_path / "storage"))
    with DagsterInstance.get() as dagster_instance:
        yield dagster_instance
