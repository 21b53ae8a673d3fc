"""Ranking metrics for a single relevant item (leave-one-out next-item prediction).

Ranks are **0-based**: rank 0 means the target is first. A target that is absent from the list has rank ``None``
(or any rank >= k), which scores 0 for every cut-off. These are the R@k / N@k used by GR2 and Diffusion-GR2 for
re-ranking and the HR@k / NDCG@k of full-ranking evaluation (HR@k == R@k with one relevant item).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["copy_rate", "ndcg_at_k", "paired_bootstrap_ci", "paired_bootstrap_mean_ci", "rank_of", "ranking_agreement",
           "recall_at_k", "summarize_ranks"]


def recall_at_k(rank_of_target: int | None, k: int) -> float:
    """1.0 if the target is within the first ``k`` positions (0-based ``rank_of_target < k``), else 0.0."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return float(rank_of_target is not None and 0 <= rank_of_target < k)


def ndcg_at_k(rank_of_target: int | None, k: int) -> float:
    """NDCG@k with one relevant item: ``1 / log2(rank + 2)`` if ``rank < k`` else 0 (the ideal DCG is 1)."""
    if not recall_at_k(rank_of_target, k):
        return 0.0
    return 1.0 / math.log2(rank_of_target + 2)


def rank_of(target: int, ranking: Sequence[int]) -> int | None:
    """0-based position of ``target`` in ``ranking``, or ``None`` when it is missing."""
    try:
        return list(ranking).index(target)
    except ValueError:
        return None


def summarize_ranks(
    ranks: Iterable[int | None], recall_ks: Sequence[int] = (1, 3, 5), ndcg_ks: Sequence[int] = (3, 5)
) -> dict[str, float]:
    """Mean ``R@k`` and ``N@k`` over a collection of 0-based ranks, keyed ``"R@1"``, ``"N@3"``, ...

    Also reports ``"n"``, the number of ranks averaged. An empty collection gives zeros (and ``n = 0``) rather than
    a division error, so callers can report empty splits.
    """
    ranks = list(ranks)
    n = len(ranks)
    out: dict[str, float] = {}
    for k in recall_ks:
        out[f"R@{k}"] = sum(recall_at_k(r, k) for r in ranks) / n if n else 0.0
    for k in ndcg_ks:
        out[f"N@{k}"] = sum(ndcg_at_k(r, k) for r in ranks) / n if n else 0.0
    out["n"] = n
    return out


def paired_bootstrap_ci(
    ranks_a: Sequence[int | None],
    ranks_b: Sequence[int | None],
    metric: str = "R@1",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(a) - metric(b)`` over the same examples (``ranks_*[i]`` ranks example ``i``).

    ``scipy.stats.bootstrap`` with ``paired=True``: examples are resampled with replacement ``n_boot`` times, the
    same resample for both sides, so the interval reflects the per-example difference rather than two independent
    noises. Returns ``{"diff", "lo", "hi", "n"}`` (the observed difference and the percentile interval at ``level``).
    """
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"paired bootstrap needs the same examples: {len(ranks_a)} vs {len(ranks_b)} ranks.")
    if not ranks_a:
        raise ValueError("paired bootstrap over no examples.")
    kind, k = metric.split("@")
    score = recall_at_k if kind == "R" else ndcg_at_k
    return paired_bootstrap_mean_ci([score(r, int(k)) for r in ranks_a], [score(r, int(k)) for r in ranks_b],
                                    n_boot, level, seed)


def copy_rate(rankings: Sequence[Sequence[str] | None], candidates: Sequence[Sequence[str]]) -> float | None:
    """Share of the valid rankings (``None``: invalid) that are their candidates' pre-rank order, verbatim: how often a
    re-ranker returns its input. ``None`` when no ranking is valid."""
    pairs = [(list(r), list(c)) for r, c in zip(rankings, candidates, strict=True) if r is not None]
    return sum(r == c for r, c in pairs) / len(pairs) if pairs else None


def _kendall_tau(a: Sequence[str], b: Sequence[str]) -> float:
    pos = {x: i for i, x in enumerate(b)}
    seq = [pos[x] for x in a]
    n = len(seq)
    if n < 2:
        return 1.0
    conc = sum(1 if seq[i] < seq[j] else -1 for i in range(n) for j in range(i + 1, n))
    return conc / (n * (n - 1) / 2)


def ranking_agreement(a: Sequence[Sequence[str] | None], b: Sequence[Sequence[str] | None]) -> dict[str, float | int]:
    """Agreement of two re-rankers on the same rows, over the rows where both rankings are valid (not ``None``) and
    rank the same items: ``top1`` (same first item), ``exact`` (same full ranking), ``kendall_tau`` (mean Kendall's
    tau), ``n`` (rows compared). Values are ``nan`` when no row qualifies."""
    if len(a) != len(b):
        raise ValueError(f"ranking_agreement needs the same rows: {len(a)} vs {len(b)} rankings.")
    pairs = [(list(x), list(y)) for x, y in zip(a, b) if x is not None and y is not None and sorted(x) == sorted(y)]
    if not pairs:
        return {"top1": math.nan, "exact": math.nan, "kendall_tau": math.nan, "n": 0}
    return {"top1": sum(x[0] == y[0] for x, y in pairs) / len(pairs),
            "exact": sum(x == y for x, y in pairs) / len(pairs),
            "kendall_tau": sum(_kendall_tau(x, y) for x, y in pairs) / len(pairs), "n": len(pairs)}


def paired_bootstrap_mean_ci(values_a: Sequence[float], values_b: Sequence[float], n_boot: int = 2000,
                             level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of ``mean(a) - mean(b)`` for per-row values (e.g. 1.0 where a student's top-1 equals the
    teacher's): ``{"diff", "lo", "hi", "n"}`` as :func:`paired_bootstrap_ci`."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(values_a) != len(values_b) or not values_a:
        raise ValueError(f"paired bootstrap needs the same, non-empty rows: {len(values_a)} vs {len(values_b)}.")
    sa, sb = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    diff = float(sa.mean() - sb.mean())
    if len(sa) == 1:
        return {"diff": diff, "lo": diff, "hi": diff, "n": 1}
    res = bootstrap((sa, sb), lambda x, y, axis: x.mean(axis) - y.mean(axis), n_resamples=n_boot, paired=True,
                    vectorized=True, confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return {"diff": diff, "lo": float(res.confidence_interval.low), "hi": float(res.confidence_interval.high),
            "n": len(sa)}
