"""A classical learned re-ranker: logistic regression over six features of each candidate.

The reasoning re-ranker should beat this, or its explanation adds nothing a feature model cannot see. Features of a
candidate (all from the prompt's own evidence plus training popularity):

1. pre-rank position / (n - 1);
2. 1 / (position + 1) (the pre-ranker's confidence falls off fast);
3. attribute (brand / category) tokens shared with the last history item;
4. ... with the union of the last three history items;
5. ... with the union of all shown history items;
6. log(1 + training purchases of the candidate).

The model is fit on the train split (target candidate = 1, the others = 0) and ranks each list by its score (ties
keep the pre-rank order). Fitting is scikit-learn's L-BFGS logistic regression on standardised features:
deterministic and a few seconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["FEATURES", "LogisticReRanker", "candidate_features", "popularity_counts"]

FEATURES = ("position", "inverse_position", "shared_last", "shared_last3", "shared_all", "log_popularity")


def candidate_features(
    history: Sequence[int],
    candidates: Sequence[int],
    attributes: Callable[[int], Sequence[str]] | Mapping[int, Sequence[str]],
    popularity: Mapping[int, int],
    max_history: int | None = 20,
) -> list[list[float]]:
    """The :data:`FEATURES` of each candidate of one example, in candidate order."""
    attr = attributes if callable(attributes) else (lambda i: attributes.get(i, ()))
    shown = list(history)[-max_history:] if max_history else list(history)
    last = set(attr(shown[-1])) if shown else set()
    last3 = set().union(*(set(attr(i)) for i in shown[-3:])) if shown else set()
    every = set().union(*(set(attr(i)) for i in shown)) if shown else set()
    n = max(len(candidates) - 1, 1)
    out = []
    for pos, c in enumerate(candidates):
        a = set(attr(c))
        out.append([pos / n, 1.0 / (pos + 1), len(a & last), len(a & last3), len(a & every),
                    math.log1p(popularity.get(c, 0))])
    return out


@dataclass
class LogisticReRanker:
    """Logistic regression over :data:`FEATURES` (see the module docstring)."""

    weights: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    l2: float = 1e-3

    def fit(self, features: Sequence[Sequence[Sequence[float]]], targets: Sequence[int]) -> LogisticReRanker:
        """``features[e][c]``: the features of candidate ``c`` of example ``e``; ``targets[e]``: the target's index.

        Minimises the mean log-loss over all candidates plus ``l2 * |w|^2`` (bias unpenalised) with scikit-learn's
        ``LogisticRegression`` (L-BFGS): its objective ``C * sum(log-loss) + |w|^2 / 2`` is the same up to scale with
        ``C = 1 / (2 * l2 * n_rows)``.
        """
        from sklearn.linear_model import LogisticRegression

        if not features:
            raise ValueError("LogisticReRanker.fit: no training examples.")
        x = torch.tensor([f for ex in features for f in ex], dtype=torch.float64)
        y = [int(c == t) for ex, t in zip(features, targets) for c in range(len(ex))]
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        z = ((x - self.mean) / self.std).numpy()
        lr = LogisticRegression(C=1.0 / (2 * self.l2 * len(y)), solver="lbfgs", tol=1e-8, max_iter=1000)
        lr.fit(z, y)
        self.weights = torch.tensor([*lr.coef_[0].tolist(), float(lr.intercept_[0])], dtype=torch.float64)
        return self

    def scores(self, features: Sequence[Sequence[float]]) -> list[float]:
        """Scores of one example's candidates."""
        if self.weights is None:
            raise RuntimeError("LogisticReRanker: call fit() first.")
        x = torch.tensor(features, dtype=torch.float64)
        z = torch.cat([(x - self.mean) / self.std, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        return (z @ self.weights).tolist()

    def rerank(self, features: Sequence[Sequence[float]]) -> list[int]:
        """Candidate indices, best first (a stable sort: ties keep the pre-rank order)."""
        s = self.scores(features)
        return sorted(range(len(s)), key=lambda i: -s[i])

    def coefficients(self) -> dict[str, float]:
        """Weights per standardised feature (and the bias), for the report."""
        if self.weights is None:
            return {}
        return {**dict(zip(FEATURES, self.weights[:-1].tolist())), "bias": float(self.weights[-1])}


def popularity_counts(train_sequences: Mapping[int, Sequence[int]]) -> Counter:
    """Training purchases per item."""
    return Counter(i for s in train_sequences.values() for i in s)


def evaluate_logistic(prepared_dir, split: str = "test", limit: int | None = None, max_history: int = 20) -> dict:
    """Fit :class:`LogisticReRanker` on a prepared directory's train split and rank ``split``'s first ``limit`` rows.

    Returns ``{"n", "metrics", "prerank", "ranks", "prerank_ranks", "user_ids", "rankings", "coefficients"}``
    (``rankings``: semantic IDs, best first); rows line up with
    ``diffgr2 evaluate`` on the same split and limit (both read the examples in the prepared order).
    """
    from .candidates import SPLITS, load_prepared, load_train_sequences
    from .metrics import copy_rate, summarize_ranks

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    prepared = load_prepared(prepared_dir)
    sids = prepared.semantic_ids
    pop = popularity_counts(load_train_sequences(prepared_dir))

    def feats(ex: dict) -> list[list[float]]:
        return candidate_features(ex["history"], ex["candidates"], sids.attribute_tokens, pop, max_history)

    train = prepared.examples["train"]
    model = LogisticReRanker().fit([feats(ex) for ex in train], [ex["candidates"].index(ex["target"]) for ex in train])
    rows = prepared.examples[split][:limit] if limit is not None else prepared.examples[split]
    ranks, pre, rankings = [], [], []
    for ex in rows:
        order = model.rerank(feats(ex))
        t = ex["candidates"].index(ex["target"])
        ranks.append(order.index(t))
        pre.append(t)
        rankings.append([sids.encode(ex["candidates"][i]) for i in order])
    copy = copy_rate(rankings, [[sids.encode(c) for c in ex["candidates"]] for ex in rows])
    return {"n": len(rows), "metrics": {**summarize_ranks(ranks), "valid_rate": 1.0, "copy_rate": copy},
            "prerank": summarize_ranks(pre), "ranks": ranks, "prerank_ranks": pre,
            "user_ids": [int(ex["user_id"]) for ex in rows], "rankings": rankings,
            "coefficients": model.coefficients(), "train_examples": len(train)}


def evaluate_evidence_ranker(prepared_dir, split: str = "test", limit: int | None = None) -> dict:
    """The evidence ranker a ``targets="evidence"`` preparation fitted (:mod:`~diffgr2_trl.rerank.evidence`), applied to
    each prepared row's **prompt** (nothing else of the row is read but the target, for scoring): the ranking the
    traces teach, i.e. what a teacher imitating them could reach. Same return layout as :func:`evaluate_logistic`, plus
    ``score_metrics``: the continuous score's ranking (the procedure before it is cut into levels)."""
    from .evidence import grouped_ranking
    from .metrics import copy_rate, summarize_ranks
    from .pipeline_data import load_evidence_ranker, load_split
    from .prompts import parse_prompt

    ranker = load_evidence_ranker(prepared_dir)
    ds = load_split(prepared_dir, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.select_columns(["prompt", "candidates", "target", "user_id"]).to_list()
    lists = [parse_prompt(row["prompt"]) for row in rows]
    for row, (_, cands) in zip(rows, lists):
        if [c.sid for c in cands] != list(row["candidates"]):
            raise ValueError(f"user {row['user_id']}: the prompt's candidates differ from the row's 'candidates' column.")
    ranks, score_ranks, pre, rankings = [], [], [], []
    for row, scores in zip(rows, ranker.scores_many(lists)):
        cands = list(row["candidates"])
        ranking = grouped_ranking(cands, ranker.levels_of(scores))
        rankings.append(ranking)
        ranks.append(ranking.index(row["target"]))
        by_score = [cands[i] for i in sorted(range(len(scores)), key=lambda i: -scores[i])]
        score_ranks.append(by_score.index(row["target"]))
        pre.append(cands.index(row["target"]))
    copy = copy_rate(rankings, [r["candidates"] for r in rows])
    return {"n": len(rows), "metrics": {**summarize_ranks(ranks), "valid_rate": 1.0, "copy_rate": copy},
            "score_metrics": summarize_ranks(score_ranks), "prerank": summarize_ranks(pre), "ranks": ranks,
            "prerank_ranks": pre, "user_ids": [int(r["user_id"]) for r in rows], "rankings": rankings,
            "levels": ranker.n_levels, "thresholds": ranker.thresholds}
