"""Constrained answer decoding: every ranking a valid permutation of the row's candidates.

A completion has a fixed shape (see :mod:`diffgr2_trl.rerank.prompts`)::

    {"explanation": "<free text>", "recommendations": ["<SID>", "<SID>", ...]}<eos>

:class:`RankingConstraint` holds one row's candidates as token sequences and answers, for a partly decoded
completion (a *canvas*: one token id per position, ``-1`` where still masked), which tokens may go at a position:

- the explanation opener is forced at the start; the explanation is free text except structural tokens, stop
  tokens and tokens whose text holds a quote, a backslash or a control character (they would end the completion or
  break the JSON string);
- once the recommendations opener sits at completion position ``o``, the rest of the answer has a fixed width: slot
  ``i`` level ``j`` is position ``o + len(opener) + i * (L + len(separator)) + j`` for SIDs of ``L`` tokens, then the
  closer and EOS. That is how the block sampler finds slot positions: from the opener's position alone;
- inside the list a slot may only take a token of a candidate that keeps the committed slots completable to a
  *permutation* of the candidates: a bipartite matching between slots and candidates, not a greedy per-slot check, so
  a block sampler committing several slots in parallel can never reach a dead end (two slots both left with only the
  same candidate);
- the answer must fit: the opener can sit no later than ``max_length - answer_length``, and at that position it is
  forced, so a row never runs out of budget before its ranking. Before the opener is placed, nothing is committed past
  that position (the answer's positions are not known yet).

The same object drives the AR decoder (:class:`RankingLogitsProcessor`, a ``transformers`` logits processor: the
canvas is the prefix generated so far) and the block sampler (which commits several positions per step and checks
each commit with :meth:`RankingConstraint.consistent`).
"""

from __future__ import annotations

import itertools
import weakref
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import torch

# the core's protocol: MASKED ("not committed yet") and Allowed (what may go at a position), defined there once
from ..block_diffusion.constraints import MASKED, NOTHING, Allowed
from .prompts import CLOSE, EXPLANATION_OPEN, RECOMMENDATIONS_OPEN, SEPARATOR

# matching states a RankingConstraint remembers (one decode visits a few hundred at most)
_FEASIBLE_CACHE_SIZE = 4096


def _perfect_matching(compat: list[list[int]], n: int) -> list[int] | None:
    """Slot -> candidate assignment covering every slot (Kuhn's augmenting paths), or None."""
    owner = [-1] * n  # candidate -> slot

    def augment(slot: int, seen: list[bool]) -> bool:
        for c in compat[slot]:
            if not seen[c]:
                seen[c] = True
                if owner[c] < 0 or augment(owner[c], seen):
                    owner[c] = slot
                    return True
        return False

    for slot in range(len(compat)):
        if not augment(slot, [False] * n):
            return None
    match = [-1] * len(compat)
    for c, slot in enumerate(owner):
        if slot >= 0:
            match[slot] = c
    return match


def feasible_candidates(compat: list[list[int]], n: int) -> list[set[int]] | None:
    """Per slot, the candidates it takes in *some* perfect matching (None when there is none).

    Edge ``(i, c)`` with ``c`` not ``i``'s matched candidate ``c0`` lies in a perfect matching iff ``c0`` is
    reachable from ``c`` by moving matched slots along compatible edges (an alternating cycle through ``(i, c)``).
    """
    match = _perfect_matching(compat, n)
    if match is None:
        return None
    slot_of = {c: s for s, c in enumerate(match)}
    # c -> c': the slot holding c may move to c'
    succ = {c: compat[slot_of[c]] for c in range(n) if c in slot_of}
    reach: dict[int, set[int]] = {}
    for c in range(n):
        seen, stack = {c}, [c]
        while stack:
            for d in succ.get(stack.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        reach[c] = seen
    return [{c for c in compat[i] if match[i] in reach[c]} for i in range(len(compat))]


class RankingConstraint:
    """One row's answer constraint (see the module docstring).

    Args:
        candidates: the row's candidate IDs, each as its token ids (all the same length ``L``).
        explanation_open / recommendations_open / separator / close: token ids of the template's structural pieces.
        stop_token_ids: EOS and any other stop tokens; the first ends the answer.
        max_length: the completion budget (``max_completion_length``).
        banned_in_explanation: extra token ids the explanation may not use (e.g. the mask token).
    """

    def __init__(
        self,
        candidates: Sequence[Sequence[int]],
        *,
        explanation_open: Sequence[int],
        recommendations_open: Sequence[int],
        separator: Sequence[int],
        close: Sequence[int],
        stop_token_ids: Sequence[int],
        max_length: int,
        banned_in_explanation: Sequence[int] = (),
    ) -> None:
        if not candidates:
            raise ValueError("A ranking constraint needs at least one candidate.")
        widths = {len(c) for c in candidates}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(f"Every candidate ID must have the same non-zero number of tokens, got widths {sorted(widths)}.")
        if len({tuple(c) for c in candidates}) != len(candidates):
            raise ValueError("Candidate IDs must be distinct to form a permutation.")
        if not stop_token_ids:
            raise ValueError("A ranking constraint needs the EOS token id (stop_token_ids).")
        for name, piece in (("explanation_open", explanation_open), ("recommendations_open", recommendations_open),
                            ("separator", separator), ("close", close)):
            if not piece:
                raise ValueError(f"The template piece {name} tokenises to nothing.")
        self.candidates = [tuple(int(t) for t in c) for c in candidates]
        self.n, self.width = len(self.candidates), widths.pop()
        self.head = tuple(explanation_open)
        self.opener, self.sep, self.close = tuple(recommendations_open), tuple(separator), tuple(close)
        self.eos = int(stop_token_ids[0])
        self.answer_length = (len(self.opener) + self.n * self.width + (self.n - 1) * len(self.sep)
                              + len(self.close) + 1)
        self.max_length = max_length
        self.latest_opener = max_length - self.answer_length
        if self.latest_opener < len(self.head):
            raise ValueError(
                f"max_completion_length={max_length} cannot hold the answer: the template and {self.n} IDs take "
                f"{len(self.head) + self.answer_length} tokens. Raise max_completion_length."
            )
        structural = {self.head[0], self.opener[0], self.sep[0], self.close[0]}
        self.explanation = Allowed(banned=frozenset({*structural, *map(int, stop_token_ids), *banned_in_explanation}))
        self._explanation_or_opener = Allowed(banned=self.explanation.banned - {self.opener[0]})
        # answer roles by offset from the opener: ("fixed", token) or ("slot", i, j)
        roles: list[tuple] = [("fixed", t) for t in self.opener]
        for i in range(self.n):
            roles += [("slot", i, j) for j in range(self.width)]
            if i < self.n - 1:
                roles += [("fixed", t) for t in self.sep]
        roles += [("fixed", t) for t in self.close] + [("fixed", self.eos)]
        self.roles = roles
        # One Allowed object per distinct answer, so callers can key caches (vocabulary masks) by identity.
        self._head_allowed = [Allowed(only=frozenset({t})) for t in self.head]
        self._role_allowed = [Allowed(only=frozenset({r[1]})) if r[0] == "fixed" else None for r in roles]
        self._opener_only = Allowed(only=frozenset({self.opener[0]}))
        self._past_answer = Allowed()
        self._slot_allowed: dict[tuple, dict[tuple[int, int], Allowed]] = {}
        self._interned: dict[frozenset[int], Allowed] = {}  # one object (one vocabulary mask) per token set
        # candidates (a bitset) holding token t at level j: a slot's compatible candidates by intersection
        self._holding: list[dict[int, int]] = [{} for _ in range(self.width)]
        for c, cand in enumerate(self.candidates):
            for j, t in enumerate(cand):
                self._holding[j][t] = self._holding[j].get(t, 0) | (1 << c)
        self._everyone = list(range(self.n))
        # tokens any candidate has at each level: a quick test that rejects most stray tokens before any matching
        self._level_tokens = [frozenset(c[j] for c in self.candidates) for j in range(self.width)]
        self._feasible_cache: dict[tuple, list[set[int]] | None] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer, candidates: Sequence[str], max_length: int, *,
                       stop_token_ids: Sequence[int] | None = None) -> RankingConstraint:
        """Build from SID strings and the tokenizer the model decodes with (the template of ``rerank.prompts``)."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        stops = list(stop_token_ids) if stop_token_ids else [tok.eos_token_id]
        banned = [t for t in json_unsafe_tokens(tok) if t not in stops]
        return cls([ids(c) for c in candidates], explanation_open=ids(EXPLANATION_OPEN),
                   recommendations_open=ids(RECOMMENDATIONS_OPEN), separator=ids(SEPARATOR), close=ids(CLOSE),
                   stop_token_ids=stops, max_length=max_length, banned_in_explanation=banned)

    @classmethod
    def for_rows(cls, tokenizer, candidates: Sequence[Sequence[str]], max_length: int,
                 stop_token_ids: Iterable[int]) -> list[RankingConstraint]:
        """One constraint per row of a batch, for decoders that stop at any of ``stop_token_ids``.

        The tokenizer's EOS, if it is a stop token, comes first: a finished ranking is closed with the first stop
        token, and EOS is the one every consumer of the text strips.
        """
        stop = set(stop_token_ids)
        if not stop:
            raise ValueError("RankingConstraint.for_rows: at least one stop token id is needed.")
        eos = getattr(getattr(tokenizer, "tokenizer", tokenizer), "eos_token_id", None)
        stops = [eos, *sorted(stop - {eos})] if eos in stop else sorted(stop)
        return [cls.from_tokenizer(tokenizer, list(c), max_length, stop_token_ids=stops) for c in candidates]

    # ------------------------------------------------------------------ state of a canvas
    def _opener_at(self, canvas: Sequence[int]) -> int | None:
        """Position of the recommendations opener (its first token is banned in the explanation, so it is unique)."""
        try:  # list.index scans at C speed: this runs for every row at every step
            return canvas.index(self.opener[0], len(self.head), self.max_length)
        except ValueError:
            return None

    def _slots(self, canvas: Sequence[int], o: int) -> tuple[tuple[int, ...], ...] | None:
        """Committed tokens per slot (``-1``: masked) given the opener at ``o``; None if a committed token breaks the
        layout (a wrong fixed token)."""
        slots = [[MASKED] * self.width for _ in range(self.n)]
        for k, role in enumerate(self.roles):
            p = o + k
            if p >= len(canvas):
                break
            t = canvas[p]
            if t == MASKED:
                continue
            if role[0] == "fixed":
                if t != role[1]:
                    return None
            else:
                slots[role[1]][role[2]] = t
        return tuple(tuple(s) for s in slots)

    def _feasible(self, slots: tuple[tuple[int, ...], ...]) -> list[set[int]] | None:
        """Per slot, the candidates it can still take in a full permutation (cached per slot state)."""
        if slots not in self._feasible_cache:
            if len(self._feasible_cache) >= _FEASIBLE_CACHE_SIZE:  # bounded: a long decode starts the cache over
                self._feasible_cache.clear()
            compat = []
            for slot in slots:
                bits = -1  # every candidate
                for j, t in enumerate(slot):
                    if t != MASKED:
                        bits &= self._holding[j].get(t, 0)
                compat.append(self._everyone if bits == -1 else [c for c in self._everyone if bits >> c & 1])
            self._feasible_cache[slots] = feasible_candidates(compat, self.n)
        return self._feasible_cache[slots]

    def consistent(self, canvas: Sequence[int]) -> bool:
        """Whether the committed tokens of ``canvas`` can still be completed to a valid answer."""
        for p, t in enumerate(self.head):
            if p < len(canvas) and canvas[p] not in (MASKED, t):
                return False
        o = self._opener_at(canvas)
        end = o if o is not None else len(canvas)
        banned, latest = self.explanation.banned, self.latest_opener
        for p in range(len(self.head), end):
            t = canvas[p]
            if t != MASKED and (t in banned or p >= latest):
                return False
        if o is None:
            return True
        if o > self.latest_opener:
            return False
        slots = self._slots(canvas, o)
        return slots is not None and self._feasible(slots) is not None

    def allowed(self, canvas: Sequence[int], position: int) -> Allowed:
        """Tokens that may go at ``position`` given the other committed tokens of ``canvas`` (its own entry ignored)."""
        canvas = list(canvas)
        canvas[position] = MASKED
        return self.allowed_many(canvas, [position])[0]

    def allowed_many(self, canvas: Sequence[int], positions: Sequence[int]) -> list[Allowed]:
        """:meth:`allowed` for several *masked* positions of one canvas, analysing the canvas once (the sampler's
        per-step call: each answer is against the committed state, not against the others' proposals)."""
        head, n_roles = len(self.head), len(self.roles)
        o = self._opener_at(canvas)
        out = []
        if o is None:
            # only tokens committed after an asked position can clash with an opener placed there
            lo = min(positions, default=len(canvas))
            committed = [(p, canvas[p]) for p in range(lo + 1, len(canvas)) if canvas[p] != MASKED]
            where = [p for p, _ in committed]
            # Before the opener is placed (most of a decode): the explanation, plus the opener where it fits. Written
            # as one tight loop because it runs for every masked position of every row at every step.
            length, latest, opener_width = len(canvas), self.latest_opener, len(self.opener)
            for position in positions:
                if position < head:
                    out.append(self._head_allowed[position])
                elif position > latest:
                    out.append(NOTHING)  # the answer's positions are not known until the opener is placed: wait
                else:
                    i = bisect_right(where, position)
                    fits = position + opener_width <= length and (i == len(where)
                                                                  or self._opener_fits(position, committed, i))
                    if position == latest:
                        out.append(self._opener_only if fits else NOTHING)
                    else:
                        out.append(self._explanation_or_opener if fits else self.explanation)
            return out
        slots = self._slots(canvas, o)
        feasible = self._feasible(slots) if slots is not None else None
        for position in positions:
            if position < head:
                out.append(self._head_allowed[position])
            elif position < o:
                out.append(self.explanation)
            elif position - o >= n_roles:
                out.append(self._past_answer)  # after the answer's EOS: never part of the completion
            else:
                k = position - o
                fixed = self._role_allowed[k]
                if fixed is not None:
                    out.append(fixed)
                elif feasible is None:
                    out.append(NOTHING)
                else:
                    out.append(self._slot_token_allowed(slots, feasible, self.roles[k][1], self.roles[k][2]))
        return out

    def _slot_token_allowed(self, slots: tuple, feasible: list[set[int]], slot: int, level: int) -> Allowed:
        """The tokens slot ``slot`` may take at ``level`` in matching state ``slots`` (one object per state)."""
        per_state = self._slot_allowed.setdefault(slots, {})
        allowed = per_state.get((slot, level))
        if allowed is None:
            tokens = frozenset(self.candidates[c][level] for c in feasible[slot])
            allowed = self._interned.setdefault(tokens, Allowed(only=tokens))
            per_state[(slot, level)] = allowed
        return allowed

    def _opener_fits(self, position: int, committed: list[tuple[int, int]], start: int) -> bool:
        """Whether the opener may start at ``position`` given the tokens committed after it (``committed[start:]``,
        ``(position, token)`` pairs, at least one): each must fit its role in the answer laid out from there, and the
        slots stay completable. Reads the committed pairs in place (it runs for every masked position)."""
        slots = None
        roles, n_roles = self.roles, len(self.roles)
        for q, t in itertools.islice(committed, start, None):
            k = q - position
            if k >= n_roles:
                break  # after the answer's EOS: never part of the completion
            role = roles[k]
            if role[0] == "fixed":
                if t != role[1]:
                    return False
            elif t not in self._level_tokens[role[2]]:
                return False
            else:
                if slots is None:
                    slots = [[MASKED] * self.width for _ in range(self.n)]
                slots[role[1]][role[2]] = t
        return slots is None or self._feasible(tuple(tuple(s) for s in slots)) is not None


# tokenizer -> (its length, its JSON-unsafe ids): weak keys, so a tokenizer's entry goes with it; nothing is written
# onto the tokenizer itself
_JSON_UNSAFE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def json_unsafe_tokens(tokenizer) -> frozenset[int]:
    """Token ids an explanation may not hold: special tokens, and tokens whose text would end or break the JSON
    string (a quote, a backslash, a control character). Computed once per tokenizer and vocabulary size."""
    try:
        cached = _JSON_UNSAFE.get(tokenizer)
    except TypeError:  # an unhashable or non-weak-referenceable tokenizer: computed each time
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    unsafe = set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if '"' in text or "\\" in text or any(ord(ch) < 0x20 for ch in text):
            unsafe.add(token_id)
    result = frozenset(unsafe)
    try:
        _JSON_UNSAFE[tokenizer] = (len(tokenizer), result)
    except TypeError:  # pragma: no cover - see above
        pass
    return result


class RankingLogitsProcessor:
    """A ``transformers`` logits processor applying one :class:`RankingConstraint` per row of ``model.generate``.

    Args:
        constraints: one constraint per row of the batch (None: that row is not constrained).
        prompt_length: the (padded) prompt width: generated tokens start at this column of ``input_ids``.

    Example:
        >>> proc = RankingLogitsProcessor([RankingConstraint.from_tokenizer(tok, cands, 256)], ids.shape[1])
        >>> model.generate(ids, logits_processor=LogitsProcessorList([proc]), max_new_tokens=256)
    """

    def __init__(self, constraints: Sequence[RankingConstraint | None], prompt_length: int) -> None:
        self.constraints = list(constraints)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.constraints):
            raise ValueError(f"RankingLogitsProcessor has {len(self.constraints)} constraints for a batch of "
                             f"{input_ids.shape[0]} rows (one per row; num_return_sequences/beams are not supported).")
        generated = input_ids[:, self.prompt_length:].tolist()
        rows, keeps = [], []
        for r, constraint in enumerate(self.constraints):
            if constraint is None:
                continue
            p = len(generated[r])
            if p >= constraint.max_length:
                continue
            allowed = constraint.allowed(generated[r] + [MASKED], p)
            if allowed.only is not None and not allowed.only:  # cannot happen for a consistent prefix: fail loudly
                raise RuntimeError(f"Row {r}: no token satisfies the ranking constraint at position {p}.")
            rows.append(r)
            keeps.append(allowed.vocab_mask(scores.shape[-1], scores.device))
        if len(rows) == scores.shape[0]:  # one write for the batch: per-row writes cost more than the rule
            scores = scores.masked_fill(~torch.stack(keeps), float("-inf"))
        elif rows:
            index = torch.tensor(rows, device=scores.device)
            scores[index] = scores[index].masked_fill(~torch.stack(keeps), float("-inf"))
        return scores
