"""Noise for the masked-diffusion objective: which completion tokens are masked, and at what ratio."""

from __future__ import annotations

import math

import torch

from .masks import block_ids
from .spec import BlockDiffusionSpec


def mask_ratio(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """Fraction of tokens masked at noise level ``t`` in [0, 1]."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(t * (math.pi / 2))
    raise ValueError(f"Unknown noise schedule {schedule!r}; expected 'linear' or 'cosine'.")


def sample_noise_mask(
    completion: torch.Tensor,
    comp_start: int,
    spec: BlockDiffusionSpec,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw which completion tokens to mask.

    Args:
        completion: ``(batch, N)`` bool, True where a token may be noised (the completion; the prompt stays clean).
        comp_start: column of the first completion token.

    Returns:
        ``(masked, ratio)``: ``(batch, N)`` bool mask and the mask ratio each token was drawn with (1 outside
        the completion, so ``1 / ratio`` weights stay finite).
    """
    batch, n = completion.shape
    device = completion.device
    blocks = block_ids(torch.arange(n, device=device), comp_start, spec.block_size)
    num_blocks = int(blocks.max().item()) + 1 if n > comp_start else 1
    groups = num_blocks if spec.noise_per == "block" else 1
    u = torch.rand(batch, groups, generator=generator, device=device)
    t = spec.min_mask_ratio + (spec.max_mask_ratio - spec.min_mask_ratio) * u
    ratio_g = mask_ratio(t, spec.noise_schedule).clamp_min(1e-6)
    idx = blocks.clamp_min(0) if spec.noise_per == "block" else torch.zeros_like(blocks)
    ratio = ratio_g[:, idx]
    draw = torch.rand(batch, n, generator=generator, device=device)
    masked = (draw < ratio) & completion
    ratio = torch.where(completion, ratio, torch.ones_like(ratio))
    return masked, ratio
