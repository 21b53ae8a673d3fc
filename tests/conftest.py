"""Shared fixtures: tiny models and tokenizers built locally (no hub), seeded."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from diffgr2_trl.modeling import build_model, build_word_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DIGITS = [str(i) for i in range(32)]
WORDS = DIGITS + ["sort", "copy", ":", "->", "think", "answer", "[", "]", ","]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(params=["qwen3", "qwen2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(word_tokenizer):
    return build_model("qwen3", tokenizer=word_tokenizer, seed=0)
