"""Likelihood of sampled trajectories under a block-diffusion policy.

Trajectory replay (TraceRL style): each committed token is scored under the canvas of the denoising step at which
it was committed, under the block-causal mask with token shift, exactly as the sampler saw it. The states of all
steps are packed into one forward: noisy stream ``k`` holds, for every block, that block's canvas at step ``k``
(blocks never see each other's noisy tokens, so one stream can host every block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from .layout import apply_temperature, exclude_mask_token, packed_layout, source_index
from .objective import check_positions, multi_stream_forward
from .spec import BlockDiffusionSpec
from .wrappers import forward_inside, unwrap_model


@dataclass
class TokenLogprobs:
    """Per-token log-probabilities of a completion, as :func:`replay_logprobs` and the estimators return them.

    Attributes:
        logps: ``(batch, T)`` per-token log-probability estimates (meaningless where ``step_map < 0``; mask them out).
        entropies: ``(batch, T)`` entropy of the distribution each token was scored under, or None.
        forward_passes: model forwards run for the batch (each sample takes part in every one).
        streams: noisy streams packed into those forwards: each costs one completion-length of extra tokens, so
            ``1 + streams / forward_passes`` is roughly the sequence-length multiple of a forward.
    """

    logps: torch.Tensor
    entropies: torch.Tensor | None
    forward_passes: int
    streams: int


def score_tokens(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log p(target), entropy or None)`` under ``softmax(logits / temperature)`` (the mask token already
    excluded by the caller). The entropy is a detached diagnostic."""
    logp_all = torch.log_softmax(apply_temperature(logits, temperature).float(), -1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if compute_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logps, entropy


def _num_steps(step_map: torch.Tensor) -> int:
    """Denoising steps the deepest block took (at least 1, so an empty trajectory still has one state)."""
    return max(int(step_map.max().item()) + 1 if step_map.numel() else 1, 1)


def _states(canvas_ids, step_map, spec, block_steps):
    """The state each noisy stream shows (a step, or per token a step) and the stream each token is read from."""
    t = canvas_ids.shape[1]
    if block_steps is not None:
        state = block_steps.repeat_interleave(spec.block_size, dim=1)[:, :t]
        if state.shape != canvas_ids.shape:
            raise ValueError(f"block_steps has {block_steps.shape[1]} blocks; {t} completion tokens need "
                             f"{-(-t // spec.block_size)} at block size {spec.block_size}.")
        return [state], torch.zeros_like(step_map)
    return list(range(_num_steps(step_map))), step_map


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
    clean, valid, position_ids = packed_layout(prompt_ids, prompt_mask, canvas_ids)
    check_positions(model, position_ids)
    n = clean.shape[1]
    # Each noisy stream holds, per token, the step whose canvas it shows (`states`); each token is read from the
    # stream showing its commit state (`stream_of`). All steps: stream k shows step k everywhere. block_steps: the
    # one stream shows each block at its drawn step, and every token is read from it.
    states, stream_of = _states(canvas_ids, step_map, spec, block_steps)
    per = max_streams_per_forward or len(states)
    cols = torch.arange(comp_start, n, device=canvas_ids.device)
    # Everything, the output layer included, runs inside one forward call of the (possibly wrapped) model: FSDP
    # gathers sharded weights, the output layer's among them, only there.
    logits = forward_inside(model, _replay, model, clean, valid, position_ids, comp_start, spec, canvas_ids,
                            step_map, states, stream_of, per, cols)
    return exclude_mask_token(logits, spec.mask_token_id)


# Causal LMs whose forward scales the output layer's logits by a config field, and how (``transformers`` 5.x). The
# same field name means opposite things across families (Granite divides by ``logits_scaling``, HyperCLOVA X
# multiplies), so the model type decides, never the field alone.
LOGIT_SCALING: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), ("logit_scale", "mul")),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                     "granitemoe_swa", "minicpm3"), ("logits_scaling", "div")),
    "hyperclovax": ("logits_scaling", "mul"),
}


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states: its output layer, then the forward's post-processing of logits
    (Cohere's ``logit_scale``, Granite's ``logits_scaling``, final soft-capping as Gemma 2 applies it), so that the
    replay matches the sampler's full forwards. :func:`check_output_logits` proves it on a probe forward."""
    inner = unwrap_model(model)
    config = getattr(inner.config, "text_config", None) or inner.config
    logits = inner.get_output_embeddings()(hidden)
    field, op = LOGIT_SCALING.get(getattr(config, "model_type", None), (None, None))
    scale = getattr(config, field, None) if field else None
    if scale is not None:
        logits = logits * scale if op == "mul" else logits / scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_output_logits(model) -> None:
    """Refuse a model whose forward post-processes its logits in a way :func:`output_logits` does not reproduce.

    Trajectory replay and the estimators apply the output layer themselves (to gathered states only); an unknown
    scaling or cap in the model's forward would make every replayed log-probability silently differ from the
    sampler's. One tiny forward compares the two.
    """
    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=device) % inner.config.get_text_config().vocab_size
    with torch.no_grad():
        out = inner(input_ids=ids, output_hidden_states=True, use_cache=False)
        theirs = out.logits.float()
        atol = 1e-3 * (1 + theirs.abs().max().item())
        # Once a trainer has prepared the model with bf16/fp16 mixed precision, accelerate wraps its forward in
        # autocast for good, so the forward's output layer ran in reduced precision: compare against the output layer
        # applied under each autocast dtype too (the replay applies it under the trainer's autocast as well).
        worst = math.inf
        for dtype in (None, torch.bfloat16, torch.float16):
            try:
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    ours = output_logits(inner, out.hidden_states[-1]).float()
            except RuntimeError:  # an autocast dtype this device does not support
                continue
            if torch.allclose(ours, theirs, rtol=1e-3, atol=atol):
                return
            worst = min(worst, (ours - theirs).abs().max().item())
    raise ValueError(
        f"{type(inner).__name__} ({getattr(inner.config, 'model_type', '?')}) post-processes its logits in a way "
        f"block diffusion does not reproduce: applying its output layer to the last hidden states differs from "
        f"its forward's logits by up to {worst:.3g}. Trajectory replay would score tokens under other "
        "distributions than the sampler's. Add the model type to "
        "diffgr2_trl.block_diffusion.likelihood.LOGIT_SCALING (or open an issue).")


def _replay_hidden(forward, model, clean, valid, position_ids, comp_start, spec, canvas_ids, step_map, states,
                   stream_of, per, cols, recompute: bool = False) -> torch.Tensor:
    """Final hidden states ``(batch, T, H)`` of each completion token at its commit state.

    ``recompute``: each forward chunk runs under activation checkpointing, so only its gathered ``(batch, T, H)``
    states outlive it and its activations (the packed streams and their dense mask) are rebuilt during backward,
    one chunk at a time; without it every chunk's graph is kept until backward.
    """
    n, t = clean.shape[1], canvas_ids.shape[1]

    def chunk(lo: int, hi: int) -> torch.Tensor:
        # the canvas a stream shows: tokens committed before its state's step, the rest still masked
        noisy = [torch.where((step_map < s) & (step_map >= 0), canvas_ids, spec.mask_token_id) for s in states[lo:hi]]
        out = multi_stream_forward(model, clean, noisy, valid, position_ids, comp_start, spec, call=forward,
                                   logits_to_keep=1, output_hidden_states=True)
        h = out.hidden_states[-1]
        src = source_index(cols, comp_start, spec, noisy_offset=n + (stream_of - lo).clamp(0, hi - lo - 1) * t)
        return h.gather(1, src.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    hidden = None
    for lo in range(0, len(states), per):
        hi = min(lo + per, len(states))
        if recompute and torch.is_grad_enabled():
            gathered = torch.utils.checkpoint.checkpoint(chunk, lo, hi, use_reentrant=False)
        else:
            gathered = chunk(lo, hi)
        if hidden is None:  # the first chunk fills every position (never-committed ones included)
            hidden = gathered
            continue
        # Tokens read from the clean stream (a block's first, with token shift) see the same state in every chunk:
        # they keep the first chunk's.
        src_is_noisy = source_index(cols, comp_start, spec, noisy_offset=n + (stream_of - lo).clamp(0, hi - lo - 1) * t) >= n
        in_chunk = (stream_of >= lo) & (stream_of < hi) & src_is_noisy
        hidden = torch.where(in_chunk.unsqueeze(-1), gathered, hidden)
    return hidden


def _replay(forward, model, clean, valid, position_ids, comp_start, spec, canvas_ids, step_map, states, stream_of,
            per, cols) -> torch.Tensor:
    hidden = _replay_hidden(forward, model, clean, valid, position_ids, comp_start, spec, canvas_ids, step_map,
                            states, stream_of, per, cols)
    # The LM head runs once, on the T gathered states, rather than on every stream of every forward.
    return output_logits(model, hidden).float()


def _replay_chunked(forward, model, clean, valid, position_ids, comp_start, spec, canvas_ids, step_map, states,
                    stream_of, per, cols, fn, columns, recompute) -> tuple[torch.Tensor, ...]:
    hidden = _replay_hidden(forward, model, clean, valid, position_ids, comp_start, spec, canvas_ids, step_map,
                            states, stream_of, per, cols, recompute=recompute)

    def head(h: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        logits = exclude_mask_token(output_logits(model, h).float(), spec.mask_token_id)  # (batch, c, V)
        return tuple(fn(logits, slice(lo, hi)))

    pieces = []
    t = canvas_ids.shape[1]
    for lo in range(0, t, columns):
        hi = min(lo + columns, t)
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Only the chunk's inputs are kept; its (batch, c, V) logits and their softmax intermediates are
            # rebuilt in backward, one chunk at a time.
            pieces.append(torch.utils.checkpoint.checkpoint(head, hidden[:, lo:hi], lo, hi, use_reentrant=False))
        else:
            pieces.append(head(hidden[:, lo:hi], lo, hi))
    return tuple(torch.cat(parts, 1) for parts in zip(*pieces, strict=True))


def replay_chunked(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    step_map: torch.Tensor,
    spec: BlockDiffusionSpec,
    fn: Callable[[torch.Tensor, slice], Sequence[torch.Tensor]],
    *,
    chunk_size: int = 1024,
    max_streams_per_forward: int | None = None,
    block_steps: torch.Tensor | None = None,
    recompute: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-token quantities of the replay computed from its logits a chunk of columns at a time, never all at once.

    ``fn(logits, columns)`` gets the ``(batch, c, V)`` float32 logits of completion columns ``columns`` (a slice of
    ``0..T``; the mask token's logit at -inf, exactly as :func:`replay_logits` returns them) and returns one or more
    ``(batch, c)`` tensors; their chunks are concatenated into ``(batch, T)`` tensors. Under autograd each chunk runs
    through activation checkpointing: only the ``(batch, T, H)`` hidden states are kept, and a chunk's logits are
    rebuilt in backward. Memory for the output layer is then O(``chunk_size`` x V) instead of O(batch x T x V),
    with the same values and gradients (one more output-layer matmul per chunk in backward).

    Args:
        chunk_size: token positions (rows x columns) per chunk; the columns per chunk are
            ``max(1, chunk_size // batch)``.
        recompute: also checkpoint each replay forward chunk (``max_streams_per_forward`` streams): the packed
            streams' activations are rebuilt in backward, so memory no longer grows with the number of chunks.
        max_streams_per_forward / block_steps: as in :func:`replay_logits`.

    Everything, the output layer included, runs inside one forward call of the (possibly wrapped) model, as in
    :func:`replay_logits`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    comp_start = prompt_ids.shape[1]
    clean, valid, position_ids = packed_layout(prompt_ids, prompt_mask, canvas_ids)
    check_positions(model, position_ids)
    states, stream_of = _states(canvas_ids, step_map, spec, block_steps)
    per = max_streams_per_forward or len(states)
    cols = torch.arange(comp_start, clean.shape[1], device=canvas_ids.device)
    columns = max(1, chunk_size // max(1, canvas_ids.shape[0]))
    return forward_inside(model, _replay_chunked, model, clean, valid, position_ids, comp_start, spec, canvas_ids,
                          step_map, states, stream_of, per, cols, fn, columns, recompute)


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
    compute_entropy: bool = False,
    max_streams_per_forward: int | None = None,
    recompute: bool = False,
    chunk_size: int = 1024,
) -> TokenLogprobs:
    """Trajectory replay: log-probability of each committed token under ``softmax(logits / temperature)`` at its
    commit state (:func:`replay_logits`), with entropies and the forward cost.

    ``.logps`` equals ``SamplerOutput.logprobs`` at the same weights and temperature, inside ``completion_mask``.
    It keeps the autograd graph (policy-gradient losses backpropagate through it).

    ``recompute``: bounded memory (:func:`replay_chunked`): the output layer runs ``chunk_size`` positions at a
    time and each forward chunk of ``max_streams_per_forward`` streams is rebuilt in backward, so neither the
    ``(batch, T, V)`` logits nor every chunk's graph is held until backward. Same values and gradients.
    """
    steps = _num_steps(step_map)
    per = max_streams_per_forward or steps
    if recompute:
        def scores(logits: torch.Tensor, columns: slice) -> tuple[torch.Tensor, ...]:
            logps, entropy = score_tokens(logits, canvas_ids[:, columns], temperature, compute_entropy)
            return (logps,) if entropy is None else (logps, entropy)

        out = replay_chunked(model, prompt_ids, prompt_mask, canvas_ids, step_map, spec, scores,
                             chunk_size=chunk_size, max_streams_per_forward=max_streams_per_forward, recompute=True)
        return TokenLogprobs(out[0], out[1] if compute_entropy else None, forward_passes=-(-steps // per),
                             streams=steps)
    logits = replay_logits(model, prompt_ids, prompt_mask, canvas_ids, step_map, spec,
                           max_streams_per_forward=max_streams_per_forward)
    logps, entropy = score_tokens(logits, canvas_ids, temperature, compute_entropy)
    return TokenLogprobs(logps, entropy, forward_passes=-(-steps // per), streams=steps)
