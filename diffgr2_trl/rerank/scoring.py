"""Re-ranking rewards (the one implementation of the reward math) with TRL's reward-function signature ``f(prompts, completions, **kwargs) -> list[float | None]``.

Column contract (TRL passes every extra dataset column as a keyword, one entry per completion):

- ``candidates``: the candidate SID strings in pre-rank order (a list; a JSON list string or a string of
  concatenated SIDs is also accepted, for datasets that store it flat);
- ``target``: the SID string of the true next item.

Completions may be plain strings or conversations (the last assistant message is scored). What each function returns:

- a float per completion. A completion that does not parse to a permutation of the candidates (any text, a wrong
  type, a truncated answer) is an invalid ranking and scores what the function defines for it (the rank rewards
  ``invalid_penalty``, the metrics 0); malformed completions never raise;
- ``None`` (TRL: "reward not applicable", NaN) for exactly one case: the row's ``target`` is a string that is not
  among its candidates (the pre-ranker missed the true item), where no rank can be scored;
- :class:`RewardColumnError` (a ``ValueError`` naming the column and the row) when the dataset columns are unusable:
  a missing ``candidates``/``target`` column, a column that is not one entry per completion, candidates that are
  not distinct SID strings (integer item ids, an empty list, a JSON string that does not parse, a string with no
  SID in it, duplicates) or a target that is not a string. Such a dataset is a bug to fix, not a row to skip, so it
  is never turned into a quiet ``None``.

Use from TRL's CLI unchanged: ``trl grpo ... --reward_funcs diffgr2_trl.rewards.rerank.gr2_reward
diffgr2_trl.rewards.rerank.ndcg_at_3`` (:mod:`diffgr2_trl.rewards.rerank` re-exports this module).
Factories (``make_gr2_reward(alpha=0.1)`` ...) return functions with a descriptive ``__name__``, the name TRL logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from .metrics import ndcg_at_k, rank_of, recall_at_k
from .parsing import ParseResult, is_canonical, parse_ranking
from .prompts import SID_RE

RewardFunc = Callable[..., list[float | None]]

DEFAULT_ALPHA = 0.2
DEFAULT_INVALID_PENALTY = -1.0


def rank_promotion_score(
    ranking: Sequence[str] | None, candidates: Sequence[str], target: str, invalid: float = -1.0
) -> float:
    """GR2 rank reward of one parsed ranking: (pre-rank position of the target - its re-ranked position) /
    len(candidates), in [-1, 1]. An invalid ranking (``None``) gets ``invalid`` (the paper: -1); with 10 candidates
    this is the paper's ``/ 10``."""
    if ranking is None:
        return float(invalid)
    return (list(candidates).index(target) - list(ranking).index(target)) / len(candidates)


def _rank(ranking: Sequence[str] | None, target: str) -> int | None:
    """0-based position of ``target`` in a parsed ranking; ``None`` (scores 0) for an invalid ranking."""
    return None if ranking is None else rank_of(target, ranking)


class RewardColumnError(ValueError):
    """A re-ranking reward got an unusable ``candidates`` or ``target`` dataset column (see the module docstring)."""


def _as_candidates(value: Any, i: int) -> list[str]:
    """The candidates of row ``i`` as a list of distinct SID strings; :class:`RewardColumnError` otherwise."""
    original = value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except ValueError as e:
                raise RewardColumnError(f"candidates[{i}] is a string starting with '[' that is not a JSON list "
                                        f"({e}): {original[:80]!r}.") from None
        else:
            value = SID_RE.findall(stripped)
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise RewardColumnError(f"candidates[{i}] must be a list of candidate SID strings, got "
                                f"{type(original).__name__} {original!r:.80}.")
    value = list(value)
    if not value:
        raise RewardColumnError(f"candidates[{i}] holds no candidate (got {original!r:.80}); a string must contain "
                                "the SIDs, e.g. '<a_1><b_2><c_3><d_4>'.")
    wrong = next((c for c in value if not isinstance(c, str)), None)
    if wrong is not None:
        raise RewardColumnError(f"candidates[{i}] holds {type(wrong).__name__} {wrong!r:.40}: the rewards compare the "
                                "completion's ranking with the candidates' SID strings (the IDs the answer writes), "
                                "not item ids; map item ids to SIDs when building the dataset.")
    if len(set(value)) != len(value):
        dup = next(c for c in value if value.count(c) > 1)
        raise RewardColumnError(f"candidates[{i}] lists {dup!r} more than once; candidates must be distinct.")
    return value


def _column(kwargs: dict[str, Any], name: str, n: int) -> Sequence:
    if name not in kwargs:
        raise RewardColumnError(f"The re-ranking rewards need a {name!r} dataset column (TRL passes every column as a "
                                f"keyword argument); got columns {sorted(kwargs)}.")
    col = kwargs[name]
    if not isinstance(col, Sequence) or isinstance(col, str | bytes) or len(col) != n:
        size = len(col) if isinstance(col, Sequence) else type(col).__name__
        raise RewardColumnError(f"The {name!r} keyword must hold one entry per completion ({n}), got {size!r:.80}.")
    return col


def _examples(completions: Any, kwargs: dict[str, Any]):
    """Yield (completion, parse result, candidates, target); parse result None where the target is not a
    candidate. Raises :class:`RewardColumnError` for unusable columns."""
    if not isinstance(completions, Sequence) or isinstance(completions, str | bytes):
        return
    if not completions:
        return
    cand_col = _column(kwargs, "candidates", len(completions))
    target_col = _column(kwargs, "target", len(completions))
    for i, completion in enumerate(completions):
        cands = _as_candidates(cand_col[i], i)
        target = target_col[i]
        if not isinstance(target, str):
            raise RewardColumnError(f"target[{i}] must be the true item's SID string, got {type(target).__name__} "
                                    f"{target!r:.80}.")
        if target not in cands:
            yield completion, None, None, None  # not applicable: no rank of the target to score
            continue
        yield completion, parse_ranking(completion, cands), cands, target


def _named(func: Callable, name: str, doc: str) -> RewardFunc:
    func.__name__ = func.__qualname__ = name
    func.__doc__ = doc
    return func


def make_rank_promotion(invalid_penalty: float = DEFAULT_INVALID_PENALTY, name: str | None = None) -> RewardFunc:
    """GR2 rank reward: (pre-rank position - re-ranked position of the target) / n; invalid ranking -> penalty."""

    def reward(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
        return [
            None if r is None else rank_promotion_score(r.ranking, c, t, invalid_penalty)
            for _, r, c, t in _examples(completions, kwargs)
        ]

    return _named(reward, name or f"rank_promotion_p{invalid_penalty:g}", make_rank_promotion.__doc__)


def _format_bonus(r: ParseResult, completion: Any, cands: list[str], target: str, alpha: float, strict: bool) -> float:
    # Format counts only when the ranking is a valid permutation (and, if strict, in canonical form) ...
    ok = r.valid and (not strict or is_canonical(completion))
    if not ok:
        return 0.0
    # ... and is paid only if the target moved up or was already first: copying the input order earns nothing.
    promoted = rank_promotion_score(r.ranking, cands, target) > 0
    return alpha if promoted or cands[0] == target else 0.0


def make_conditional_format(alpha: float = DEFAULT_ALPHA, strict: bool = False, name: str | None = None) -> RewardFunc:
    """GR2 format reward: ``alpha`` x format validity, paid only when the rank reward is positive or the target was
    already first in the pre-rank order (the condition that stops the copy-the-input-order hack).

    ``strict=True`` also requires the exact canonical serialisation (no whitespace variants), useful for
    block-diffusion policies whose answer template should stay rigid.
    """

    def reward(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
        return [
            None if r is None else _format_bonus(r, completion, c, t, alpha, strict)
            for completion, r, c, t in _examples(completions, kwargs)
        ]

    default = f"conditional_format_a{alpha:g}" + ("_strict" if strict else "")
    return _named(reward, name or default, make_conditional_format.__doc__)


def make_gr2_reward(
    alpha: float = DEFAULT_ALPHA,
    invalid_penalty: float = DEFAULT_INVALID_PENALTY,
    strict: bool = False,
    name: str | None = None,
) -> RewardFunc:
    """GR2's full reward in one function: rank promotion + conditional format bonus.

    Range: ``[min(invalid_penalty, -(n-1)/n), (n-1)/n + alpha]``; invalid rollouts get exactly ``invalid_penalty``.
    """

    def reward(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for completion, r, c, t in _examples(completions, kwargs):
            if r is None:
                out.append(None)
            else:
                rank = rank_promotion_score(r.ranking, c, t, invalid_penalty)
                out.append(rank + _format_bonus(r, completion, c, t, alpha, strict))
        return out

    default = f"gr2_reward_a{alpha:g}_p{invalid_penalty:g}" + ("_strict" if strict else "")
    return _named(reward, name or default, make_gr2_reward.__doc__)


def make_ndcg_at_k(k: int, name: str | None = None) -> RewardFunc:
    """NDCG@k of the target in the re-ranked list; 0 for an invalid ranking (no fallback to the pre-rank order,
    so the reward never credits a broken output)."""

    def reward(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
        return [None if r is None else ndcg_at_k(_rank(r.ranking, t), k) for _, r, _, t in _examples(completions, kwargs)]

    return _named(reward, name or f"ndcg_at_{k}", make_ndcg_at_k.__doc__)


def make_recall_at_k(k: int, name: str | None = None) -> RewardFunc:
    """Recall@k (hit) of the target in the re-ranked list; 0 for an invalid ranking."""

    def reward(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
        return [None if r is None else recall_at_k(_rank(r.ranking, t), k) for _, r, _, t in _examples(completions, kwargs)]

    return _named(reward, name or f"recall_at_{k}", make_recall_at_k.__doc__)


def validity(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float | None]:
    """1.0 when the completion parses to a permutation of the candidates, else 0.0."""
    return [None if r is None else float(r.valid) for _, r, _, _ in _examples(completions, kwargs)]


# Ready-made instances with the paper's settings; TRL logs them under these names.
rank_promotion = make_rank_promotion(name="rank_promotion")
conditional_format = make_conditional_format(name="conditional_format")
gr2_reward = make_gr2_reward(name="gr2_reward")
gr2_reward_strict = make_gr2_reward(strict=True, name="gr2_reward_strict")
ndcg_at_3 = make_ndcg_at_k(3)
ndcg_at_5 = make_ndcg_at_k(5)
ndcg_at_10 = make_ndcg_at_k(10)
recall_at_1 = make_recall_at_k(1)
recall_at_3 = make_recall_at_k(3)
recall_at_5 = make_recall_at_k(5)

__all__ = [
    "RewardColumnError",
    "RewardFunc",
    "conditional_format",
    "gr2_reward",
    "gr2_reward_strict",
    "make_conditional_format",
    "make_gr2_reward",
    "make_ndcg_at_k",
    "make_rank_promotion",
    "make_recall_at_k",
    "ndcg_at_10",
    "ndcg_at_3",
    "ndcg_at_5",
    "rank_promotion",
    "rank_promotion_score",
    "recall_at_1",
    "recall_at_3",
    "recall_at_5",
    "validity",
]
