"""Per-token log-likelihood estimators of block-diffusion completions, for policy-gradient RL.

A block-diffusion policy has no exact per-token likelihood the way an AR model does: a token's probability depends
on which other positions of its block were already denoised. Three estimators are in use:

``"trajectory_replay"`` (TraceRL; the default)
    Each committed token is scored under the canvas of the step at which the sampler committed it. At fixed weights
    this is exactly the sampler's probability, so PPO/GRPO importance ratios are those of the real policy. All step
    states are packed into one forward (one noisy stream per step): cost grows with the number of steps per block.
``"mean_field"`` (d1, "one-step")
    One noisy stream with the whole completion masked: each block is scored from its fully-masked state given the
    committed earlier blocks. The prompt may be masked at random with probability ``prompt_mask_prob`` (d1's
    regulariser). One stream, whatever the number of steps; biased w.r.t. the parallel sampler.
``"elbo"``
    ``K`` random masks (one noisy stream each, packed in one forward), drawn in complementary pairs: mask ``m`` at a
    per-block ratio ``t ~ U(0, 1)`` and its complement (ratio ``1 - t``, also uniform), so every token is masked in
    exactly half of the draws; an odd ``K`` adds the all-masked state. A token's estimate is the mean of its
    log-probability over the draws in which it was masked: the masked-diffusion ELBO term of that token,
    self-normalised rather than weighted by ``1 / t`` (the ``1/t`` weight has unbounded variance near ``t = 0``,
    which turns into wildly clipped importance ratios in PPO-style losses).

Stochastic estimators take one integer seed per row; with the same seeds (and weights) they return the same numbers,
which is what lets the trainer compute old and new log-probs under the same randomness.
"""

from __future__ import annotations

import torch

from .layout import exclude_mask_token, packed_layout, source_index
from .likelihood import TokenLogprobs, replay_logprobs, score_tokens
from .noise import sample_noise_mask
from .objective import check_positions, multi_stream_logits
from .spec import BlockDiffusionSpec

ESTIMATORS = ("trajectory_replay", "mean_field", "elbo")


def check_estimator(name: str) -> str:
    """``name`` if it is one of :data:`ESTIMATORS`; raise ``ValueError`` listing them otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown likelihood estimator {name!r}; expected one of {list(ESTIMATORS)}.")
    return name


def _row_generators(seeds: torch.Tensor | None, batch: int, device) -> list[torch.Generator | None]:
    if seeds is None:
        return [None] * batch
    if seeds.numel() != batch:
        raise ValueError(f"Need one seed per row: got {seeds.numel()} seeds for {batch} rows.")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]


def _masked_stream_logits(model, clean, valid, position_ids, comp_start, spec, noisy: list[torch.Tensor], per: int):
    """Logits ``(batch, K, T, V)`` predicting each completion column from each of the ``K`` noisy streams."""
    n = clean.shape[1]
    t = n - comp_start
    cols = torch.arange(comp_start, n, device=clean.device)
    out = []
    for lo in range(0, len(noisy), per):
        chunk = noisy[lo : lo + per]
        offsets = n + t * torch.arange(len(chunk), device=clean.device)[:, None]  # stream k starts at n + k * t
        keep = source_index(cols, comp_start, spec, noisy_offset=offsets).flatten()
        logits = multi_stream_logits(model, clean, chunk, valid, position_ids, comp_start, spec, keep)
        out.append(logits.view(clean.shape[0], len(chunk), t, -1))
    return exclude_mask_token(torch.cat(out, 1), spec.mask_token_id)


def mean_field_logprobs(
    model, prompt_ids, prompt_mask, canvas_ids, spec: BlockDiffusionSpec, *,
    temperature: float = 1.0, prompt_mask_prob: float = 0.0, seeds: torch.Tensor | None = None,
    compute_entropy: bool = False,
) -> TokenLogprobs:
    """d1's one-step estimator on block diffusion (see the module docstring)."""
    if not 0.0 <= prompt_mask_prob < 1.0:
        raise ValueError(f"prompt_mask_prob must be in [0, 1), got {prompt_mask_prob}.")
    comp_start = prompt_ids.shape[1]
    if prompt_mask_prob > 0:
        gens = _row_generators(seeds, prompt_ids.shape[0], prompt_ids.device)
        draw = torch.stack([torch.rand(comp_start, generator=g, device=prompt_ids.device) for g in gens])
        hide = (draw < prompt_mask_prob) & prompt_mask.bool()
        prompt_ids = prompt_ids.masked_fill(hide, spec.mask_token_id)
    clean, valid, position_ids = packed_layout(prompt_ids, prompt_mask, canvas_ids)
    check_positions(model, position_ids)
    noisy = [torch.full_like(canvas_ids, spec.mask_token_id)]
    logits = _masked_stream_logits(model, clean, valid, position_ids, comp_start, spec, noisy, per=1)[:, 0]
    logps, entropy = score_tokens(logits, canvas_ids, temperature, compute_entropy)
    return TokenLogprobs(logps, entropy, forward_passes=1, streams=1)


def elbo_masks(canvas_ids: torch.Tensor, spec: BlockDiffusionSpec, num_samples: int,
               seeds: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, K, T)`` bool masks for the ELBO estimator: complementary pairs, plus all-masked for an odd ``K``."""
    if num_samples < 1:
        raise ValueError(f"elbo_samples must be >= 1, got {num_samples}.")
    batch, t = canvas_ids.shape
    device = canvas_ids.device
    # Full-range t regardless of the CFT spec's noise range: the ELBO integrates over t in (0, 1].
    draw_spec = BlockDiffusionSpec.from_dict({**spec.to_dict(), "min_mask_ratio": 0.0, "max_mask_ratio": 1.0})
    completion = torch.ones(1, t, dtype=torch.bool, device=device)
    rows = []
    for g in _row_generators(seeds, batch, device):
        masks = []
        for _ in range(num_samples // 2):
            m, _ = sample_noise_mask(completion, 0, draw_spec, g)
            masks += [m[0], ~m[0]]
        if num_samples % 2:
            masks.append(torch.ones(t, dtype=torch.bool, device=device))
        rows.append(torch.stack(masks))
    return torch.stack(rows)


def elbo_logprobs(
    model, prompt_ids, prompt_mask, canvas_ids, spec: BlockDiffusionSpec, *,
    num_samples: int = 4, temperature: float = 1.0, seeds: torch.Tensor | None = None,
    compute_entropy: bool = False, max_streams_per_forward: int | None = None,
) -> TokenLogprobs:
    """Per-token masked-diffusion ELBO over ``num_samples`` masks packed in one forward (see the module docstring)."""
    comp_start = prompt_ids.shape[1]
    masks = elbo_masks(canvas_ids, spec, num_samples, seeds)  # (B, K, T)
    clean, valid, position_ids = packed_layout(prompt_ids, prompt_mask, canvas_ids)
    check_positions(model, position_ids)
    noisy = [torch.where(masks[:, k], torch.full_like(canvas_ids, spec.mask_token_id), canvas_ids)
             for k in range(num_samples)]
    per = max_streams_per_forward or num_samples
    logits = _masked_stream_logits(model, clean, valid, position_ids, comp_start, spec, noisy, per)
    targets = canvas_ids.unsqueeze(1).expand(-1, num_samples, -1)
    logps, entropy = score_tokens(logits, targets, temperature, compute_entropy)
    # With token shift a block's first token is predicted from the clean stream, the same in every draw: it is
    # scored identically whether or not it is "masked", and the pairs guarantee it is counted at least once.
    w = masks.float()
    count = w.sum(1).clamp_min(1.0)
    logps = (logps * w).sum(1) / count
    if entropy is not None:
        entropy = (entropy * w).sum(1) / count
    return TokenLogprobs(logps, entropy, forward_passes=-(-num_samples // per), streams=num_samples)


def estimate_token_logprobs(
    model,
    estimator: str,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    step_map: torch.Tensor,
    spec: BlockDiffusionSpec,
    *,
    temperature: float = 1.0,
    seeds: torch.Tensor | None = None,
    prompt_mask_prob: float = 0.0,
    elbo_samples: int = 4,
    compute_entropy: bool = False,
    max_streams_per_forward: int | None = None,
    recompute: bool = False,
) -> TokenLogprobs:
    """Dispatch to one estimator by name.

    Args:
        prompt_ids, prompt_mask: ``(batch, P)`` left-padded prompts as given to the sampler.
        canvas_ids, step_map: ``(batch, T)`` from :class:`~diffgr2_trl.block_diffusion.SamplerOutput` (``T`` may be
            cut to a block boundary past the last completion token; later columns cannot influence earlier ones).
        seeds: ``(batch,)`` integer seeds for the stochastic estimators (``mean_field`` with prompt masking,
            ``elbo``); None draws from the global RNG.
        recompute: ``trajectory_replay`` only: bounded memory (see :func:`replay_logprobs`).
    """
    check_estimator(estimator)
    if recompute and estimator != "trajectory_replay":
        raise ValueError(f"recompute (bounded likelihood memory) is implemented for trajectory_replay only, not "
                         f"{estimator!r}.")
    if estimator == "trajectory_replay":
        return replay_logprobs(model, prompt_ids, prompt_mask, canvas_ids, step_map, spec,
                               temperature=temperature, compute_entropy=compute_entropy,
                               max_streams_per_forward=max_streams_per_forward, recompute=recompute)
    if estimator == "mean_field":
        return mean_field_logprobs(model, prompt_ids, prompt_mask, canvas_ids, spec, temperature=temperature,
                                   prompt_mask_prob=prompt_mask_prob, seeds=seeds, compute_entropy=compute_entropy)
    return elbo_logprobs(model, prompt_ids, prompt_mask, canvas_ids, spec, num_samples=elbo_samples,
                         temperature=temperature, seeds=seeds, compute_entropy=compute_entropy,
                         max_streams_per_forward=max_streams_per_forward)
