"""Shared test fixtures: one MiniLM prompt encoder for the whole run (it loads in seconds), tiny configs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from worldloop.models.config import ModelConfig, preset
from worldloop.models.text import PromptEncoder

# ``--backend auto`` (every serving command's default) would pick ONNX Runtime's int8 graphs on a CPU without
# native bf16 and export them on first use; the suite runs PyTorch unless a test asks for a backend (the
# servers it starts in subprocesses inherit this). tests/test_bench.py checks what auto picks.
os.environ["WORLDLOOP_BACKEND"] = "torch"


@pytest.fixture(scope="session")
def make_prompt_encoder() -> Callable[[int], PromptEncoder]:
    """``make_prompt_encoder(max_tokens)``: one shared PromptEncoder per token count for the whole run."""
    encoders: dict[int, PromptEncoder] = {}

    def make(max_tokens: int) -> PromptEncoder:
        if max_tokens not in encoders:
            encoders[max_tokens] = PromptEncoder(max_tokens)
        return encoders[max_tokens]

    return make


@pytest.fixture(scope="session")
def prompt_encoder(make_prompt_encoder: Callable[[int], PromptEncoder]) -> PromptEncoder:
    """The shared prompt encoder sized for the ``tiny`` preset."""
    return make_prompt_encoder(preset("tiny").dit.max_prompt_tokens)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return preset("tiny")


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: tiny shapes gain nothing from two, and on a loaded 2-core machine a
    second spinning thread stalls every small op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
