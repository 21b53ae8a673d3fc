"""Where every token of a block-diffusion forward sits, and how its logits are read: the one copy of each rule.

Training (:mod:`.objective`), the sampler (:mod:`.sampler`), trajectory replay (:mod:`.likelihood`) and the
likelihood estimators (:mod:`.estimators`) all lay out tokens the same way; when each rebuilt the layout itself, a
fix in one place (token shift at a block boundary, a left-padding offset) could silently miss the others and break
the exactness the tests check (cache == no cache, replay == the sampler's log-probabilities). So:

* :func:`packed_layout` packs ``[prompt || completion]`` into clean ids, validity and position ids;
* :func:`stream_columns` gives the stream and column of every query and key of a forward, which
  :func:`~diffgr2_trl.block_diffusion.masks.dense_mask` / ``flex_block_mask`` turn into the attention mask;
* :func:`source_index` says which hidden state predicts each completion token (the token shift);
* :func:`exclude_mask_token` and :func:`apply_temperature` turn raw logits into the distribution tokens are
  drawn from and scored under.
"""

from __future__ import annotations

import torch

from .spec import BlockDiffusionSpec


def position_ids_of(valid: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded ``(batch, N)`` validity mask: real tokens count from 0, padding gets 0."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def packed_layout(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean stream of ``[prompt || completion]``: ``(clean_ids, valid, position_ids)``, each ``(batch, P + T)``.

    Prompts are left-padded, so every row's completion starts at column ``P`` and shares one block layout. Every
    completion column counts as valid: what sits after a stop token was still visible to the sampler's later steps.
    """
    clean = torch.cat([prompt_ids, completion_ids], 1)
    valid = torch.cat([prompt_mask.bool(), torch.ones_like(completion_ids, dtype=torch.bool)], 1)
    return clean, valid, position_ids_of(valid)


def stream_columns(
    clean_cols: tuple[int, int], noisy_cols: tuple[int, int], num_noisy: int = 1, *, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream and column of every query and key of one forward: ``(q_stream, q_col, kv_stream, kv_col)``.

    The queries are the clean columns ``[clean_cols[0], clean_cols[1])`` (stream 0) followed by ``num_noisy`` noisy
    streams ``1..num_noisy``, each covering the columns ``[noisy_cols[0], noisy_cols[1])`` (only completion columns:
    a noisy copy of the prompt would be attended by nobody). The keys are the clean columns ``[0, clean_cols[0])``
    already in the KV cache (none for a full forward) followed by the queries.

    A training / replay forward is ``stream_columns((0, N), (comp_start, N), K)``; a sampler step with ``cached``
    columns in the cache is ``stream_columns((cached, start), (start, start + width))``.
    """
    (c_lo, c_hi), (n_lo, n_hi) = clean_cols, noisy_cols
    width = n_hi - n_lo
    q_stream = torch.cat([torch.zeros(c_hi - c_lo, dtype=torch.long, device=device),
                          torch.arange(1, num_noisy + 1, device=device).repeat_interleave(width)])
    q_col = torch.cat([torch.arange(c_lo, c_hi, device=device), torch.arange(n_lo, n_hi, device=device).repeat(num_noisy)])
    kv_stream = torch.cat([torch.zeros(c_lo, dtype=torch.long, device=device), q_stream])
    kv_col = torch.cat([torch.arange(c_lo, device=device), q_col])
    return q_stream, q_col, kv_stream, kv_col


def source_index(
    cols: torch.Tensor, comp_start: int, spec: BlockDiffusionSpec, *, noisy_offset, clean_offset=0
) -> torch.Tensor:
    """Index, among a forward's query tokens, of the hidden state that predicts the completion column(s) ``cols``.

    Args:
        cols: completion columns (``>= comp_start``) to predict.
        noisy_offset: where the noisy stream's column ``comp_start`` sits among the queries (an int, or a tensor
            broadcasting with ``cols`` when each token is read from its own stream).
        clean_offset: where the clean column ``0`` sits (minus the columns already in the KV cache).

    Without token shift column ``i`` predicts itself from the noisy stream. With it, the token at column ``i`` is
    predicted from column ``i - 1`` of the same noisy stream, except at a block's first column, whose predecessor
    belongs to the previous (committed) block: there the clean stream's ``i - 1`` is used, which has seen exactly the
    committed context, as an AR model would.
    """
    rel = cols - comp_start
    if not spec.token_shift:
        return noisy_offset + rel
    first = rel % spec.block_size == 0
    return torch.where(first, clean_offset + cols - 1, noisy_offset + rel - 1)


def exclude_mask_token(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``logits`` with the mask token's logit at -inf: the sampler never commits the mask token, so every
    probability (sampled, replayed or estimated) is normalised over the other tokens."""
    # index_fill copies once and writes one column: a broadcast masked_fill costs ~5x more on CPU
    return logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; unchanged for ``temperature`` 0 (greedy decoding ranks by the raw logits) or 1."""
    if temperature > 0 and temperature != 1.0:
        return logits / temperature
    return logits
