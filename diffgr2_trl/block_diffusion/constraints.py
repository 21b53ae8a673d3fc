"""Constrained decoding for the block sampler: which tokens may be committed where, and which commits may stand.

The sampler knows nothing of any task. A constraint is any object with two methods over a row's *canvas* (one token
id per completion position, ``-1`` where still masked):

- ``allowed_many(canvas, positions)`` returns, for masked ``positions``, objects saying what may go there given what
  is committed, in two forms: ``vocab_mask(vocab_size, device) -> bool tensor`` and ``token_ids(vocab_size, device)
  -> (ids, only)`` (the allowed ids when ``only``, else the disallowed ones): an :class:`Allowed`. Returning the same
  object for the same answer lets the sampler batch the work per answer;
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
from dataclasses import dataclass, field
from typing import Protocol

import torch

MASKED = -1  # a canvas position not committed yet (constraints read canvases of token ids with these holes)


@dataclass(frozen=True)
class Allowed:
    """Tokens allowed at one position: ``only`` (a set) when given, otherwise every token except ``banned``.

    A constraint hands out the same object for the same answer (the explanation's, a fixed token's, a slot's in one
    matching state), so its vocabulary mask is built once and shared: treat the returned tensor as read-only.
    """

    only: frozenset[int] | None = None
    banned: frozenset[int] = frozenset()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __contains__(self, token: int) -> bool:
        return token in self.only if self.only is not None else token not in self.banned

    def vocab_mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """``(vocab_size,)`` bool: True where allowed (cached per vocabulary size and device; do not modify)."""
        key = (vocab_size, device)
        mask = self._cache.get(key)
        if mask is None:
            listed = self.only if self.only is not None else self.banned
            ids = [t for t in listed if t < vocab_size]
            mask = torch.full((vocab_size,), self.only is None, dtype=torch.bool, device=device)
            if ids:
                mask[torch.tensor(ids, device=device)] = self.only is not None
            self._cache[key] = mask
        return mask

    def token_ids(self, vocab_size: int, device=None) -> tuple[torch.Tensor, bool]:
        """The sparse form of :meth:`vocab_mask`: ``(ids, True)`` for the allowed ids, or ``(ids, False)`` for the
        disallowed ones when every other token is allowed (cached; do not modify)."""
        key = ("ids", vocab_size, device)
        cached = self._cache.get(key)
        if cached is None:
            listed = self.only if self.only is not None else self.banned
            ids = torch.tensor(sorted(t for t in listed if t < vocab_size), dtype=torch.long, device=device)
            cached = self._cache[key] = (ids, self.only is not None)
        return cached


NOTHING = Allowed(only=frozenset())


class DecodingConstraint(Protocol):
    """What the sampler needs of a task's constraint (see the module docstring)."""

    def allowed_many(self, canvas: Sequence[int], positions: Sequence[int]) -> list[Allowed]: ...

    def consistent(self, canvas: Sequence[int]) -> bool: ...


def row_canvases(completion: torch.Tensor, mask_token_id: int, rows: Sequence[int]) -> dict[int, list[int]]:
    """Per constrained row, its completion as a list with masked positions as ``-1``."""
    rows = list(rows)
    if not rows:
        return {}
    picked = completion[torch.tensor(rows, device=completion.device)]
    return dict(zip(rows, picked.masked_fill(picked == mask_token_id, MASKED).tolist()))


def constrain_logits(
    logits: torch.Tensor, masked: torch.Tensor, positions: Sequence[int], canvases: dict[int, list[int]],
    constraints: Sequence[DecodingConstraint | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``logits`` ``(batch, C, V)`` at completion ``positions`` (one per column) to the allowed tokens, in place
    (the sampler passes a fresh contiguous tensor).

    Returns ``(logits, eligible)``: ``eligible`` is ``masked`` without the positions of constrained rows where nothing
    is allowed yet (their logits are left as they were, so sampling stays well defined; they are never committed).
    """
    masked_rows = masked.tolist()  # Python lists: element-wise tensor reads cost more than the rule itself
    vocab, device = logits.shape[-1], logits.device
    # Constraints hand out one object per distinct answer (the explanation's is shared by most positions): a table of
    # the distinct answers, keyed by identity, and one index per position into it. The loop stays at C speed per
    # position (map, dict lookups); Python code runs once per distinct object.
    table_of: dict[int, int] = {}
    answers_seen: list = []  # the distinct answer objects; also keeps them alive for the call, so no id is reused
    rows, cols, index, checked = [], [], [], []
    for r, canvas in canvases.items():
        masked_cols = [c for c, m in enumerate(masked_rows[r]) if m]
        if not masked_cols:
            continue
        answers = constraints[r].allowed_many(canvas, [positions[c] for c in masked_cols])
        ids = list(map(id, answers))
        for key, allowed in dict(zip(ids, answers)).items():
            if key not in table_of:
                table_of[key] = len(answers_seen)
                answers_seen.append(allowed)
        rows += [r] * len(masked_cols)
        cols += masked_cols
        index += map(table_of.__getitem__, ids)
        checked.append(r)
    eligible = masked.clone()
    if not rows:
        return logits, eligible
    where = torch.tensor(rows, device=device) * logits.shape[1] + torch.tensor(cols, device=device)
    index_t = torch.tensor(index, device=device)
    flat = logits.view(-1, vocab)
    if len(rows) * vocab <= DENSE_LIMIT:
        nonempty = _mask_dense(flat, where, index_t, [a.vocab_mask(vocab, device) for a in answers_seen])
    else:
        nonempty = _mask_sparse(flat, where, index_t, [a.token_ids(vocab, device) for a in answers_seen])
    eligible.view(-1)[where] = nonempty[index_t]
    for r, alive in zip(checked, eligible[checked].any(-1).tolist()):
        if not alive:
            raise RuntimeError(f"Row {r}: the decoding constraint allows no token at any masked position of the "
                               "block (a dead end: the constraint is inconsistent with what it allowed before).")
    return logits, eligible


DENSE_LIMIT = 1 << 18
"""Up to this many (position, token) logits a step masks densely: fewer ops, and a small pass over the logits costs
less than the sparse path's fixed number of small ops (measured on CPU: batch 1 is dense, batch 32 sparse)."""


def _mask_dense(flat: torch.Tensor, where: torch.Tensor, index: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """:func:`_mask_sparse` by a dense ``(positions, V)`` masked write."""
    table = torch.stack(masks)
    nonempty = table.any(-1)
    table[~nonempty] = True  # nothing allowed yet: leave the logits as they are (the position is made ineligible)
    flat[where] = flat[where].masked_fill(~table[index], float("-inf"))
    return nonempty


def _mask_sparse(flat: torch.Tensor, where: torch.Tensor, index: torch.Tensor,
                 sparse: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Apply ``sparse[index[i]]`` to row ``where[i]`` of ``flat`` ``(rows, V)`` logits, touching few entries.

    A dense ``(positions, V)`` masked write is a pass over every logit of every position, which costs more than the
    model's step for a small model. Instead a position whose answer lists disallowed ids (the free text: most of the
    vocabulary allowed) gets -inf at those ids, and one that lists allowed ids (a slot, a fixed token) keeps those
    logits and has the rest of its row filled. Every position is handled by a few batched ops, whatever the number of
    distinct answers. Returns, per answer, whether it allows anything (positions that allow nothing stay untouched).
    """
    device = flat.device
    lengths = torch.tensor([len(ids) for ids, _ in sparse], device=device)
    lists_allowed = torch.tensor([only for _, only in sparse], device=device)
    nonempty = torch.where(lists_allowed, lengths > 0, lengths < flat.shape[-1])
    all_ids = torch.cat([ids for ids, _ in sparse])
    starts = lengths.cumsum(0) - lengths
    for only in (False, True):
        take = (lists_allowed[index] == only) & (lengths[index] > 0)
        if not take.any():
            continue
        rows, picked = where[take], index[take]
        counts = lengths[picked]
        owner = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
        offsets = torch.arange(len(owner), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        at, ids = rows[owner], all_ids[starts[picked][owner] + offsets]
        if only:
            keep = flat[at, ids]
            flat[rows] = float("-inf")
            flat[at, ids] = keep
        else:
            flat[at, ids] = float("-inf")
    return nonempty


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
