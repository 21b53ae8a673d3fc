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
    rows = list(rows)
    if not rows:
        return {}
    picked = completion[torch.tensor(rows, device=completion.device)].tolist()
    return {r: [MASKED if t == mask_token_id else t for t in row] for r, row in zip(rows, picked)}


def constrain_logits(
    logits: torch.Tensor, masked: torch.Tensor, positions: Sequence[int], canvases: dict[int, list[int]],
    constraints: Sequence[DecodingConstraint | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``logits`` ``(batch, C, V)`` at completion ``positions`` (one per column) to the allowed tokens, in place
    (the sampler passes a fresh tensor).

    Returns ``(logits, eligible)``: ``eligible`` is ``masked`` without the positions of constrained rows where nothing
    is allowed yet (their logits are left as they were, so sampling stays well defined; they are never committed).
    """
    eligible = masked.clone()
    masked_rows = masked.tolist()  # Python lists: element-wise tensor reads cost more than the rule itself
    vocab = logits.shape[-1]
    cache: dict = {}  # Allowed -> (vocab mask, anything allowed); the explanation's is shared by most positions
    rows, cols, keeps = [], [], []
    for r, canvas in canvases.items():
        masked_cols = [c for c, m in enumerate(masked_rows[r]) if m]
        if not masked_cols:
            continue
        any_eligible = False
        for c, allowed in zip(masked_cols, constraints[r].allowed_many(canvas, [positions[c] for c in masked_cols])):
            if allowed not in cache:
                keep = allowed.vocab_mask(vocab, logits.device)
                cache[allowed] = (keep, bool(keep.any()))
            keep, nonempty = cache[allowed]
            if nonempty:
                rows.append(r)
                cols.append(c)
                keeps.append(keep)
                any_eligible = True
            else:
                eligible[r, c] = False
        if not any_eligible:
            raise RuntimeError(f"Row {r}: the decoding constraint allows no token at any masked position of the "
                               "block (a dead end: the constraint is inconsistent with what it allowed before).")
    if rows:  # one indexed write for the whole batch: per-position writes cost more than the rule itself
        r_idx = torch.tensor(rows, device=logits.device)
        c_idx = torch.tensor(cols, device=logits.device)
        logits[r_idx, c_idx] = logits[r_idx, c_idx].masked_fill(~torch.stack(keeps), float("-inf"))
    return logits, eligible


def keep_consistent(
    commit: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, positions: Sequence[int],
    canvases: dict[int, list[int]], constraints: Sequence[DecodingConstraint | None],
) -> torch.Tensor:
    """Drop the commits of constrained rows that would make their canvas inconsistent (most confident first)."""
    commit = commit.clone()
    commit_rows, token_rows, confidence_rows = commit.tolist(), tokens.tolist(), confidence.tolist()
    for r, canvas in canvases.items():
        cols = [c for c, m in enumerate(commit_rows[r]) if m]
        if len(cols) <= 1:
            continue  # a lone commit was allowed against the committed state: it stands
        cols.sort(key=lambda c: -confidence_rows[r][c])
        for c in cols:
            p = positions[c]
            canvas[p] = token_rows[r][c]
            if not constraints[r].consistent(canvas):
                canvas[p] = MASKED
                commit[r, c] = False
    return commit
