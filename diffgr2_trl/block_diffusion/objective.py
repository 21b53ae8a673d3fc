"""The block-diffusion training objective: a forward over ``[x_t || x_0]`` under the block-diffusion mask.

Kept here, in plain torch, rather than in remote model code, so anyone can read and reproduce it. The trainers
call :func:`block_diffusion_loss`; nothing else computes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import position_ids_of, source_index, stream_columns
from .masks import dense_mask, flex_block_mask, to_model_mask
from .noise import sample_noise_mask
from .spec import BlockDiffusionSpec
from .wrappers import unwrap_model


@dataclass
class AlignedBatch:
    """A batch re-laid so every row's completion starts at column ``comp_start`` (prompts left-padded).

    Sharing the completion start across rows gives every row the same block layout, hence one mask pattern and
    one set of logit positions, exactly as the sampler sees a left-padded batch.
    """

    input_ids: torch.Tensor  # (batch, N)
    valid: torch.Tensor  # (batch, N) bool: real tokens
    completion: torch.Tensor  # (batch, N) bool: tokens that are noised and scored
    position_ids: torch.Tensor  # (batch, N)
    comp_start: int
    segment_ids: torch.Tensor | None = None  # (batch, N) long, segment of each completion token


def align_completions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    block_size: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> AlignedBatch:
    """Left-pad prompts so completions start at one column; fill each final block with EOS after an EOS.

    The EOS fill makes "everything after EOS in the last block is EOS" a trained fact, so at decode time the
    sampler may commit those positions as EOS at once (it does) without leaving the training distribution.
    """
    rows = []
    for r in range(input_ids.shape[0]):
        real = attention_mask[r].bool()
        comp = completion_mask[r].bool() & real
        idx = comp.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(
                f"Row {r} of the batch has no completion tokens: block-diffusion training needs a non-empty "
                "completion (check the dataset's completion column and max_length truncation)."
            )
        start, end = int(idx[0]), int(idx[-1]) + 1
        if int(comp[start:end].sum()) != end - start:
            raise ValueError(f"Row {r}: completion tokens must be contiguous (one prompt, then one completion).")
        prompt = input_ids[r, :start][real[:start]]
        completion = input_ids[r, start:end]
        seg = segment_ids[r, start:end] if segment_ids is not None else None
        if eos_token_id is not None and int(completion[-1]) == eos_token_id:
            fill = (-completion.numel()) % block_size
            if fill:
                completion = torch.cat([completion, completion.new_full((fill,), eos_token_id)])
                if seg is not None:
                    seg = torch.cat([seg, seg[-1:].expand(fill)])
        rows.append((prompt, completion, seg))
    comp_start = max(p.numel() for p, _, _ in rows)
    n = comp_start + max(c.numel() for _, c, _ in rows)
    batch = len(rows)
    device = input_ids.device
    ids = input_ids.new_full((batch, n), pad_token_id)
    valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
    completion = torch.zeros_like(valid)
    segs = torch.zeros(batch, n, dtype=torch.long, device=device) if segment_ids is not None else None
    for r, (p, c, s) in enumerate(rows):
        ids[r, comp_start - p.numel() : comp_start] = p
        ids[r, comp_start : comp_start + c.numel()] = c
        valid[r, comp_start - p.numel() : comp_start + c.numel()] = True
        completion[r, comp_start : comp_start + c.numel()] = True
        if segs is not None:
            segs[r, comp_start : comp_start + c.numel()] = s
    return AlignedBatch(ids, valid, completion, position_ids_of(valid), comp_start, segs)


def check_positions(model, position_ids: torch.Tensor) -> None:
    """Fail clearly when ``position_ids`` run past the model's context (``model`` may be DDP-wrapped)."""
    limit = getattr(unwrap_model(model).config, "max_position_embeddings", None)
    if limit is not None and int(position_ids.max()) >= limit:
        raise ValueError(
            f"Sequence of {int(position_ids.max()) + 1} positions exceeds the model's max_position_embeddings "
            f"({limit}); truncate prompts/completions (e.g. max_length) or use a model with a longer context."
        )


def multi_stream_forward(
    model,
    clean_ids: torch.Tensor,
    noisy_ids: list[torch.Tensor],
    valid: torch.Tensor,
    position_ids: torch.Tensor,
    comp_start: int,
    spec: BlockDiffusionSpec,
    call=None,
    **model_kwargs,
):
    """One forward over ``[clean || noisy_1 || ... || noisy_K]`` under the block-diffusion rule.

    ``clean_ids`` is ``(batch, N)``; each noisy stream ``(batch, N - comp_start)`` covers the completion columns.
    Every stream shares the clean stream's position ids. Extra kwargs go to the model (``logits_to_keep``, ...).
    ``model`` may be wrapped (DDP, ...): the forward goes through the wrapper, attributes come from the model inside.
    ``call`` replaces ``model`` as the callable that runs the forward (the module's own ``forward`` inside
    :func:`~diffgr2_trl.block_diffusion.wrappers.forward_inside`).
    """
    n = clean_ids.shape[1]
    ids = torch.cat([clean_ids, *noisy_ids], dim=1)
    stream, col, _, _ = stream_columns((0, n), (comp_start, n), len(noisy_ids), device=clean_ids.device)
    valid_all, pos = valid[:, col], position_ids[:, col]  # a noisy token shares its column's clean validity/position
    inner = unwrap_model(model)
    impl = getattr(inner.config, "_attn_implementation", "sdpa")
    layout = dict(comp_start=comp_start, block_size=spec.block_size, clean_block_causal=spec.clean_block_causal)
    if impl == "flex_attention":
        mask = flex_block_mask(stream, col, valid_all, **layout)
    else:
        mask = to_model_mask(dense_mask(stream, col, stream, col, valid_all, **layout), impl, inner.dtype)
    return (call or model)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **model_kwargs)


def multi_stream_logits(model, clean_ids, noisy_ids, valid, position_ids, comp_start, spec, keep) -> torch.Tensor:
    """:func:`multi_stream_forward` returning only the logits at positions ``keep`` (shared by all rows)."""
    out = multi_stream_forward(model, clean_ids, noisy_ids, valid, position_ids, comp_start, spec,
                               logits_to_keep=keep.to(clean_ids.device))
    return out.logits


def block_diffusion_loss(
    model,
    batch: AlignedBatch,
    spec: BlockDiffusionSpec,
    *,
    segment_weights: tuple[float, ...] | None = None,
    loss_normalization: str = "masked",
    generator: torch.Generator | None = None,
    masked: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked block-diffusion loss of one aligned batch.

    Args:
        segment_weights: loss weight per segment id (e.g. ``(reasoning, answer)``); needs ``batch.segment_ids``.
        loss_normalization: ``"masked"`` divides the weighted token losses by the (segment-weighted) number of
            masked tokens; ``"completion"`` by the number of completion tokens (the MDLM ELBO estimator, usually
            with ``inverse_t_weighting``).
        masked: use this ``(batch, N)`` noise mask instead of drawing one (tests, replay).
        reduction: ``"mean"`` divides the weighted token losses by the normaliser of ``loss_normalization``;
            ``"sum"`` returns them undivided, so that a trainer can divide by a normaliser taken over several batches
            (every rank and micro-batch of an optimizer step).

    Returns:
        ``(loss, metrics)``; metrics hold detached per-token sums and counts that the trainer aggregates
        (``ce_sum/seg{k}``, ``correct/seg{k}``, ``masked/seg{k}``, ``masked_total``, ``completion_total``, and
        ``normaliser``: what ``"mean"`` divides by).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    check_positions(model, batch.position_ids)
    if spec.token_shift and batch.comp_start < 1:
        raise ValueError("With token_shift the prompt must hold at least one token (e.g. BOS) before the completion.")
    ratio = None
    if masked is None:
        masked, ratio = sample_noise_mask(batch.completion, batch.comp_start, spec, generator)
    else:
        masked = masked & batch.completion
    clean = batch.input_ids
    masks_list = [masked]
    if spec.complementary_masks:
        masks_list.append(batch.completion & ~masked)
    total_loss = clean.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}
    num_segments = len(segment_weights) if segment_weights is not None else 1
    seg = batch.segment_ids if batch.segment_ids is not None else torch.zeros_like(clean)
    if segment_weights is not None and batch.segment_ids is None:
        raise ValueError("segment_weights were given but the batch has no segment_ids.")
    n = clean.shape[1]
    keep = source_index(torch.arange(batch.comp_start, n, device=clean.device), batch.comp_start, spec, noisy_offset=n)
    weights_tok = (
        torch.tensor(segment_weights, dtype=torch.float32, device=clean.device)[seg]
        if segment_weights is not None
        else torch.ones(seg.shape, dtype=torch.float32, device=clean.device)
    )
    denom = clean.new_zeros((), dtype=torch.float32)
    for m in masks_list:
        noisy = torch.where(m, torch.full_like(clean, spec.mask_token_id), clean)[:, batch.comp_start :]
        logits = multi_stream_logits(
            model, clean, [noisy], batch.valid, batch.position_ids, batch.comp_start, spec, keep
        ).float()
        target = clean[:, batch.comp_start :]
        m_c = m[:, batch.comp_start :]
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        w = weights_tok[:, batch.comp_start :]
        if spec.inverse_t_weighting:
            r = ratio[:, batch.comp_start :] if ratio is not None else torch.ones_like(w)
            w = w / r
        total_loss = total_loss + (ce * w * m_c).sum()
        if loss_normalization == "masked":
            denom = denom + (weights_tok[:, batch.comp_start :] * m_c).sum()
        elif loss_normalization == "completion":
            comp_c = batch.completion[:, batch.comp_start :]
            denom = denom + (weights_tok[:, batch.comp_start :] * comp_c).sum()
        else:
            raise ValueError(f"loss_normalization must be 'masked' or 'completion', got {loss_normalization!r}.")
        with torch.no_grad():
            correct = (logits.argmax(-1) == target) & m_c
            s_c = seg[:, batch.comp_start :]
            for k in range(num_segments):
                in_k = m_c & (s_c == k)
                metrics[f"ce_sum/seg{k}"] = metrics.get(f"ce_sum/seg{k}", 0) + (ce * in_k).sum()
                metrics[f"correct/seg{k}"] = metrics.get(f"correct/seg{k}", 0) + (correct & in_k).sum()
                metrics[f"masked/seg{k}"] = metrics.get(f"masked/seg{k}", 0) + in_k.sum()
            metrics["masked_total"] = metrics.get("masked_total", 0) + m_c.sum()
            metrics["completion_total"] = metrics.get("completion_total", 0) + batch.completion.sum()
    metrics["normaliser"] = denom
    loss = total_loss / denom.clamp_min(1.0) if reduction == "mean" else total_loss
    return loss, {k: torch.as_tensor(v).detach().float() for k, v in metrics.items()}
