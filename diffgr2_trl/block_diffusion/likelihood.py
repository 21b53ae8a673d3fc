"""Likelihood of sampled trajectories under a block-diffusion policy.

Trajectory replay (TraceRL style): each committed token is scored under the canvas of the denoising step at which
it was committed, under the block-causal mask with token shift, exactly as the sampler saw it. The states of all
steps are packed into one forward: noisy stream ``k`` holds, for every block, that block's canvas at step ``k``
(blocks never see each other's noisy tokens, so one stream can host every block).
"""

from __future__ import annotations

import torch

from .objective import check_positions, multi_stream_forward
from .spec import BlockDiffusionSpec
from .wrappers import unwrap_model


def _lm_head(model):
    return unwrap_model(model).get_output_embeddings()


def _source_index(n: int, comp_start: int, step_map: torch.Tensor, spec: BlockDiffusionSpec, copy_of_step):
    """``(batch, T)`` index into ``[clean || noisy_1 ..]`` of the hidden state predicting each completion token."""
    t = n - comp_start
    cols = torch.arange(comp_start, n, device=step_map.device)
    copy = copy_of_step(step_map)  # (batch, T) noisy stream (0-based) holding each token's state
    if not spec.token_shift:
        return n + copy * t + (cols - comp_start)
    first = ((cols - comp_start) % spec.block_size == 0)[None]
    noisy = n + copy * t + (cols - 1 - comp_start)
    return torch.where(first, (cols - 1).expand_as(noisy), noisy)


def replay_logits(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    step_map: torch.Tensor,
    spec: BlockDiffusionSpec,
    *,
    max_streams_per_forward: int | None = None,
    block_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(batch, T, V)`` of each completion token at the state in which it was committed.

    Args:
        prompt_ids, prompt_mask: ``(batch, P)`` left-padded prompts, as given to the sampler.
        canvas_ids: ``(batch, T)`` tokens as committed (``SamplerOutput.canvas_ids``).
        step_map: ``(batch, T)`` step within its block at which each token was committed (-1: never). Positions
            with -1 get meaningless logits; mask them out.
        max_streams_per_forward: split the packed step states over several forwards to bound memory.
        block_steps: ``(batch, num_blocks)`` one denoising step per block ("one state per block"): a single noisy
            stream holds every block's canvas at its chosen step, so the forward costs one extra stream instead of
            one per step. Only tokens with ``step_map == block_steps[block]`` then get their commit-state logits;
            the others get the logits of a state they were not committed in and must be masked out by the caller
            (see :func:`sample_block_steps`).

    The mask token's logit is set to -inf, as in the sampler, so log-softmax of the result matches the sampler's
    log-probabilities at the same weights.
    """
    comp_start = prompt_ids.shape[1]
    clean = torch.cat([prompt_ids, canvas_ids], 1)
    n = clean.shape[1]
    valid = torch.cat([prompt_mask.bool(), torch.ones_like(canvas_ids, dtype=torch.bool)], 1)
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
    check_positions(model, position_ids)
    mask_id = spec.mask_token_id
    head = _lm_head(model)
    if block_steps is not None:
        t = canvas_ids.shape[1]
        state = block_steps.repeat_interleave(spec.block_size, dim=1)[:, :t]  # each position's block's step
        if state.shape != canvas_ids.shape:
            raise ValueError(f"block_steps has {block_steps.shape[1]} blocks; {t} completion tokens need "
                             f"{-(-t // spec.block_size)} at block size {spec.block_size}.")
        noisy = torch.where((step_map < state) & (step_map >= 0), canvas_ids, torch.full_like(canvas_ids, mask_id))
        out = multi_stream_forward(model, clean, [noisy], valid, position_ids, comp_start, spec,
                                   logits_to_keep=1, output_hidden_states=True)
        h = out.hidden_states[-1]
        src = _source_index(n, comp_start, step_map, spec, torch.zeros_like)
        hidden = h.gather(1, src.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = head(hidden).float()
        return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == mask_id, float("-inf"))
    num_steps = int(step_map.max().item()) + 1 if step_map.numel() else 0
    num_steps = max(num_steps, 1)
    per = max_streams_per_forward or num_steps
    hidden = None
    for lo in range(0, num_steps, per):
        hi = min(lo + per, num_steps)
        noisy = [torch.where((step_map < k) & (step_map >= 0), canvas_ids, torch.full_like(canvas_ids, mask_id))
                 for k in range(lo, hi)]
        out = multi_stream_forward(model, clean, noisy, valid, position_ids, comp_start, spec,
                                   logits_to_keep=1, output_hidden_states=True)
        h = out.hidden_states[-1]
        in_chunk = (step_map >= lo) & (step_map < hi)
        if lo > 0 and spec.token_shift:
            # block-start tokens come from the clean stream, identical in every chunk: take them once
            in_chunk &= ((torch.arange(canvas_ids.shape[1], device=h.device) % spec.block_size) != 0)[None]
        src = _source_index(n, comp_start, step_map, spec, lambda s, lo=lo, hi=hi: (s - lo).clamp(0, hi - lo - 1))
        gathered = h.gather(1, src.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        hidden = gathered if hidden is None else torch.where(in_chunk.unsqueeze(-1), gathered, hidden)
    logits = head(hidden).float()
    return logits.masked_fill(
        torch.arange(logits.shape[-1], device=logits.device) == mask_id, float("-inf")
    )


def sample_block_steps(
    step_map: torch.Tensor, block_size: int, loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one committing step per block, uniformly among the steps that committed a token there.

    Args:
        step_map: ``(batch, T)`` as returned by the sampler.
        loss_mask: ``(batch, T)`` positions that count (e.g. ``completion_mask``); steps that only committed
            positions outside it are never drawn. Default: every committed position.

    Returns:
        ``(block_steps (batch, num_blocks), selected (batch, T), weight (batch, T))``: the step per block (0 for a
        block with no eligible token), the positions committed at their block's drawn step (a subset of
        ``loss_mask``), and per selected position the number of eligible steps of its block (0 elsewhere): the
        inverse of its selection probability, so ``sum(weight * f)`` is an unbiased estimate of ``sum(f)`` over
        all eligible positions.
    """
    batch, t = step_map.shape
    eligible = step_map >= 0 if loss_mask is None else (step_map >= 0) & loss_mask.bool()
    nb = -(-t // block_size)
    pad = nb * block_size - t
    steps = torch.nn.functional.pad(step_map, (0, pad), value=-1).view(batch, nb, block_size)
    ok = torch.nn.functional.pad(eligible, (0, pad), value=False).view(batch, nb, block_size)
    num = int(steps.max().item()) + 1 if steps.numel() else 1
    num = max(num, 1)
    # present[b, blk, k]: step k committed an eligible token in this block
    # (a scatter would let an ineligible position overwrite an eligible one holding the same step)
    present = (torch.nn.functional.one_hot(steps.clamp_min(0), num).bool() & ok[..., None]).any(-2)
    weights = present.float()
    empty = weights.sum(-1) == 0
    weights[empty] = 1.0  # any step; nothing in the block is selected anyway
    drawn = torch.multinomial(weights.view(-1, num), 1, generator=generator).view(batch, nb)
    drawn = drawn.masked_fill(empty, 0)
    state = drawn.repeat_interleave(block_size, dim=1)[:, :t]
    selected = eligible & (step_map == state)
    num_steps = present.sum(-1).repeat_interleave(block_size, dim=1)[:, :t]
    return drawn, selected, selected.float() * num_steps.float()


def replay_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    step_map: torch.Tensor,
    spec: BlockDiffusionSpec,
    *,
    temperature: float = 1.0,
    max_streams_per_forward: int | None = None,
) -> torch.Tensor:
    """``(batch, T)`` log-probability of each committed token under ``softmax(logits / temperature)`` at its
    commit state (trajectory replay). Equals ``SamplerOutput.logprobs`` at the same weights."""
    logits = replay_logits(model, prompt_ids, prompt_mask, canvas_ids, step_map, spec,
                           max_streams_per_forward=max_streams_per_forward)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, canvas_ids.unsqueeze(-1)).squeeze(-1)
