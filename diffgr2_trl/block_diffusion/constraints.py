"""Constrained decoding for the block sampler: which tokens may be committed where, and which commits may stand.

The sampler knows nothing of any task. A constraint is any object with two methods over a row's *canvas* (one token
id per completion position, ``-1`` where still masked):

- ``allowed_many(canvas, positions)`` returns, for masked ``positions``, objects with ``vocab_mask(vocab_size,
  device) -> bool tensor`` (what may go there given what is committed);
- ``consistent(canvas) -> bool`` says whether the committed tokens can still be completed to a valid output.

Each denoising step the sampler (1) masks every position's logits to its allowed tokens, so proposals are valid one
at a time; positions with nothing allowed yet (e.g. whose role depends on a token not committed) are not eligible
this step; (2) commits the selected proposals of a row in decreasing confidence, each only if the canvas stays
consistent, since two proposals valid alone may clash (two slots taking the same item). The most confident one was
allowed against the committed state, so it always stands and every step makes progress.
:class:`~diffgr2_trl.rerank.constraints.RankingConstraint` is the re-ranking task's constraint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

MASKED = -1


class DecodingConstraint(Protocol):
    def allowed_many(self, canvas: Sequence[int], positions: Sequence[int]) -> list: ...

    def consistent(self, canvas: Sequence[int]) -> bool: ...


def row_canvases(completion: torch.Tensor, mask_token_id: int, rows: Sequence[int]) -> dict[int, list[int]]:
    """Per constrained row, its completion as a list with masked positions as ``-1``."""
    return {r: [MASKED if t == mask_token_id else t for t in completion[r].tolist()] for r in rows}


def constrain_logits(
    logits: torch.Tensor, masked: torch.Tensor, positions: Sequence[int], canvases: dict[int, list[int]],
    constraints: Sequence[DecodingConstraint | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``logits`` ``(batch, C, V)`` at completion ``positions`` (one per column) to the allowed tokens.

    Returns ``(logits, eligible)``: ``eligible`` is ``masked`` without the positions of constrained rows where nothing
    is allowed yet (their logits are left as they were, so sampling stays well defined; they are never committed).
    """
    logits = logits.clone()
    eligible = masked.clone()
    vocab = logits.shape[-1]
    cache: dict = {}
    for r, canvas in canvases.items():
        cols = [c for c in range(len(positions)) if masked[r, c]]
        if not cols:
            continue
        for c, allowed in zip(cols, constraints[r].allowed_many(canvas, [positions[c] for c in cols])):
            key = allowed if allowed.__hash__ is not None else id(allowed)
            keep = cache.get(key)
            if keep is None:
                keep = cache[key] = allowed.vocab_mask(vocab, logits.device)
            if keep.any():
                logits[r, c] = logits[r, c].masked_fill(~keep, float("-inf"))
            else:
                eligible[r, c] = False
        if not eligible[r, cols].any():
            raise RuntimeError(f"Row {r}: the decoding constraint allows no token at any masked position of the "
                               "block (a dead end: the constraint is inconsistent with what it allowed before).")
    return logits, eligible


def keep_consistent(
    commit: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, positions: Sequence[int],
    canvases: dict[int, list[int]], constraints: Sequence[DecodingConstraint | None],
) -> torch.Tensor:
    """Drop the commits of constrained rows that would make their canvas inconsistent (most confident first)."""
    commit = commit.clone()
    for r, canvas in canvases.items():
        cols = commit[r].nonzero().flatten().tolist()
        if len(cols) <= 1:
            continue
        cols.sort(key=lambda c: -float(confidence[r, c]))
        for c in cols:
            p = positions[c]
            canvas[p] = int(tokens[r, c])
            if not constraints[r].consistent(canvas):
                canvas[p] = MASKED
                commit[r, c] = False
    return commit
