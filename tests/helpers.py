"""Small builders shared by tests (kept out of conftest so tests can import them explicitly)."""

from __future__ import annotations

import copy

import torch

from diffgr2_trl.block_diffusion import convert_to_block_diffusion
from diffgr2_trl.modeling import build_model


def converted(tokenizer, arch: str = "qwen3", block_size: int = 4, seed: int = 0, **kw):
    """A tiny model of ``arch`` converted to block diffusion, with its own copy of the tokenizer."""
    tok = copy.deepcopy(tokenizer)
    model = build_model(arch, tokenizer=tok, seed=seed)
    convert_to_block_diffusion(model, tok, block_size=block_size, **kw)
    return model, tok


def random_batch(batch: int, length: int, prompt: int, low: int = 5, high: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (batch, length), generator=g)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, prompt:] = 1
    return ids, am, cm
