"""Attention masks for block diffusion: one rule, used by training, the sampler and likelihood replay.

Tokens live in *streams*: stream 0 is the clean (committed) sequence, streams 1, 2, ... are noisy copies of the
completion (the training layout ``[x_t || x_0]`` has one noisy copy; trajectory replay packs one copy per denoising
step). Columns index positions of the sequence and are shared by all streams, with the completion starting at the
same column ``comp_start`` in every row (prompts are left-padded). Block ``-1`` is the prompt.

The rule, for a query ``(q_stream, q_col)`` and a key ``(kv_stream, kv_col)``:

* clean query: sees clean keys causally; inside one completion block also bidirectionally when
  ``clean_block_causal`` (BD3-LM). Never sees noisy keys.
* noisy query in a completion block: sees the keys of its own stream in its own block (bidirectional) and the
  clean keys of earlier blocks (the prompt included). Other noisy streams are invisible.
* noisy query in the prompt (a dummy, never read): behaves like a clean query so no row is empty.

Padding is applied on top: invalid keys are hidden, and each token always sees itself so no row is empty. The
dense path materialises the rule over index grids; flex attention calls the very same function as its
``mask_mod``, so the two cannot disagree.
"""

from __future__ import annotations

import torch


def block_ids(cols: torch.Tensor, comp_start: int, block_size: int) -> torch.Tensor:
    """Block index of each column: ``-1`` for the prompt, ``(col - comp_start) // block_size`` after."""
    rel = cols - comp_start
    return torch.where(rel >= 0, torch.div(rel, block_size, rounding_mode="floor"), torch.full_like(rel, -1))


def visible(
    q_stream: torch.Tensor,
    q_col: torch.Tensor,
    kv_stream: torch.Tensor,
    kv_col: torch.Tensor,
    *,
    comp_start: int,
    block_size: int,
    clean_block_causal: bool,
) -> torch.Tensor:
    """Whether query positions may attend to key positions: the block-diffusion visibility rule (broadcasts over its
    tensor arguments; see the module docstring). Named for what it decides, apart from the constraints' ``Allowed``
    (which tokens may be committed)."""
    qb = block_ids(q_col, comp_start, block_size)
    kb = block_ids(kv_col, comp_start, block_size)
    q_clean_like = (q_stream == 0) | (qb < 0)
    kv_clean = kv_stream == 0
    causal = kv_col <= q_col
    if clean_block_causal:
        causal = causal | ((kb == qb) & (qb >= 0))
    clean_rule = q_clean_like & kv_clean & causal
    noisy_rule = (~q_clean_like) & (((kv_stream == q_stream) & (kb == qb)) | (kv_clean & (kb < qb)))
    return clean_rule | noisy_rule


def dense_mask(
    q_stream: torch.Tensor,
    q_col: torch.Tensor,
    kv_stream: torch.Tensor,
    kv_col: torch.Tensor,
    kv_valid: torch.Tensor,
    *,
    comp_start: int,
    block_size: int,
    clean_block_causal: bool,
    q_offset: int | None = None,
) -> torch.Tensor:
    """Bool mask of shape ``(batch, 1, Q, KV)``; True = may attend.

    Args:
        q_stream, q_col: ``(Q,)`` stream and column of each query token.
        kv_stream, kv_col: ``(KV,)`` stream and column of each key token.
        kv_valid: ``(batch, KV)`` bool, False for padding keys.
        q_offset: index in the key axis of the first query token (queries are the last ``Q`` keys by default),
            used to let every token see itself.
    """
    rule = visible(
        q_stream[:, None], q_col[:, None], kv_stream[None, :], kv_col[None, :],
        comp_start=comp_start, block_size=block_size, clean_block_causal=clean_block_causal,
    )
    mask = rule[None] & kv_valid[:, None, :]
    offset = kv_col.shape[0] - q_col.shape[0] if q_offset is None else q_offset
    q_idx = torch.arange(q_col.shape[0], device=q_col.device)
    mask[:, q_idx, q_idx + offset] = True
    return mask[:, None]


def to_model_mask(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert a bool mask to the form an HF attention implementation adds or applies.

    sdpa takes bool masks directly; eager *adds* the mask to the scores, so it needs 0 / most-negative floats.
    """
    if attn_implementation == "eager":
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return out.masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def flex_block_mask(
    stream: torch.Tensor,
    col: torch.Tensor,
    valid: torch.Tensor,
    *,
    comp_start: int,
    block_size: int,
    clean_block_causal: bool,
):
    """A flex-attention ``BlockMask`` for a full (uncached) forward whose queries are its keys.

    Args:
        stream, col: ``(S,)`` per token.
        valid: ``(batch, S)`` bool.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        rule = visible(
            stream[q_idx], col[q_idx], stream[kv_idx], col[kv_idx],
            comp_start=comp_start, block_size=block_size, clean_block_causal=clean_block_causal,
        )
        return (rule & valid[b, kv_idx]) | (q_idx == kv_idx)

    batch, length = valid.shape
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=valid.device)


allowed = visible  # the old name, kept for one release (it read like the constraints' Allowed)
