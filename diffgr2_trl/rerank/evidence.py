"""The evidence ranker: a label-free ranking procedure over what a re-ranking prompt shows, fitted on the train split.

Why it exists. A training trace teaches whatever relation its ranking has to the prompt. If the ranking depends on the
label in a way the prompt cannot show (e.g. "promote the target when some rule happens to pick it"), the best policy
the data teaches is to copy the incoming order, and that is what a re-ranker trained on it learns. Here the label
enters only through *fitting* this procedure on the train split; the ranking of every row is then a function of that
row's prompt alone, so a model can learn to reproduce it, and its accuracy is what a teacher imitating it can reach.

The procedure, for one prompt (history items oldest first, candidates in pre-rank order, each an
:class:`~diffgr2_trl.rerank.prompts.ItemText`):

1. **Evidence** per candidate (:func:`candidate_features`): its pre-rank position, the rarity (``idf`` over the
   training catalogue, :class:`AttributeRarity`) of the attribute tokens it shares with the last history item, the last
   three and any history item, how many history items and how recently they share a rare token, how many semantic-ID
   levels it shares with the last and any history item, how many other candidates share its link, a recency-weighted
   overlap and where it stands against the other candidates' (its rank in the list, its gap to the best). What carries the
   gain is overlap on rare tokens, mostly with the last item; common category tokens carry almost none, and on some
   Amazon categories one root token sits on every item, so rarity is measured on the data, never assumed.
2. **Score**: a gradient-boosted pointwise classifier (scikit-learn's ``HistGradientBoostingClassifier``) of "is the
   next purchase" on those features, fitted on the train split. For the train split's own traces it is *cross-fitted*
   (two folds by user): a row's trace comes from the model fitted on the other fold, so no row's ranking saw its label.
3. **Level**: the score cut into a few integer levels (``levels``; thresholds fitted on the out-of-fold train scores to
   maximise R@1 + R@3). A trace states each candidate's level, and the ranking is **the candidates grouped by level,
   highest first, pre-rank order inside a level** (:meth:`EvidenceRanker.ranking`): a copy of an order the trace has
   already written, not a sort a small model would have to do in its head.

The continuous score's own ranking (:meth:`EvidenceRanker.score_ranking`) is the procedure's ceiling; the level ranking
is what the traces teach. The report shows the latter as the "evidence ranker" reference row.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from .prompts import SID_LEVELS, ItemText

__all__ = ["FEATURES", "AttributeRarity", "EvidenceRanker", "candidate_features", "check_features", "strongest_link"]

FEATURES = (
    "position",  # pre-rank position (0 = first)
    "idf_last",  # rarest attribute token shared with the last history item (0: none)
    "idf_sum_last",  # summed rarity of the tokens shared with the last item
    "idf_last3",  # rarest token shared with one of the last three items
    "idf_any",  # rarest token shared with any shown history item
    "items_linked",  # history items sharing any token
    "rare_items_linked",  # history items sharing a token rarer than the candidate's median token
    "ago_linked",  # steps back to the most recent history item sharing the rarest linked token (history length: none)
    "sid_last",  # leading semantic-ID levels shared with the last item (0-3)
    "sid_any",  # most leading levels shared with any history item
    "idf_own",  # the candidate's own rarest token
    "link_competitors",  # other candidates sharing the candidate's rarest link to the last item
    "idf_sum_any",  # summed rarity of the tokens shared with any shown history item
    "idf_recent",  # summed rarity of shared tokens, each history item weighted RECENCY_DECAY ** steps back
    "rare_pairs",  # (history item, token) pairs sharing a token rarer than the candidate's median token
    "link_idf",  # rarity of the token the trace cites (strongest_link; 0: none)
    "recent_rank",  # rank of idf_recent within the list (0 = the list's strongest)
    "recent_gap",  # the list's largest idf_recent minus this candidate's
)
# How much an older history item's overlap counts against the last item's in ``idf_recent``: a half-life of ~2 items.
RECENCY_DECAY = 0.7


@dataclass(frozen=True)
class AttributeRarity:
    """Share of catalogue items that carry each attribute token, measured on the training data.

    ``idf(token) = log(1 / share)``; a token never seen in training counts as carried by one item.
    """

    shares: Mapping[str, float]
    n_items: int

    @classmethod
    def from_items(cls, item_attributes: Iterable[Sequence[str]]) -> AttributeRarity:
        """From the attribute tokens of every training item (one sequence per item)."""
        counts: Counter = Counter()
        n = 0
        for attrs in item_attributes:
            n += 1
            counts.update(set(attrs))
        if n == 0:
            raise ValueError("AttributeRarity.from_items: no items.")
        return cls({t: c / n for t, c in counts.items()}, n)

    def idf(self, token: str) -> float:
        return math.log(1.0 / self.shares.get(token, 1.0 / self.n_items))

    def to_dict(self) -> dict[str, Any]:
        return {"n_items": self.n_items, "shares": dict(self.shares)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttributeRarity:
        return cls(dict(d["shares"]), int(d["n_items"]))


def _sid_levels(sid: str) -> list[str]:
    return [p for p in sid.replace(">", ">\0").split("\0") if p]


def _shared_levels(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a[: len(SID_LEVELS) - 1], b):  # the last level only resolves collisions: no meaning
        if x != y:
            break
        n += 1
    return n


def strongest_link(history: Sequence[ItemText], cand: ItemText, rarity: AttributeRarity) -> tuple[str, int] | None:
    """The rarest attribute token ``cand`` shares with the history and how many steps back its most recent carrier
    is (0 = the last item), preferring the last item on equal rarity; ``None`` when it shares none."""
    best = None
    for ago, item in enumerate(reversed(history)):
        for token in dict.fromkeys(cand.attrs):
            if token in item.attrs:
                key = (rarity.idf(token), -ago)
                if best is None or key > best[0]:
                    best = (key, token, ago)
    return None if best is None else (best[1], best[2])


def candidate_features(
    history: Sequence[ItemText], candidates: Sequence[ItemText], rarity: AttributeRarity
) -> list[list[float]]:
    """The :data:`FEATURES` of each candidate, in candidate order, from the prompt's items alone."""
    hist = list(history)
    sets = [set(h.attrs) for h in hist]
    last = sets[-1] if sets else set()
    last3 = set().union(*sets[-3:]) if sets else set()
    every = set().union(*sets) if sets else set()
    hist_sids = [_sid_levels(h.sid) for h in hist]
    last_links = []
    for c in candidates:
        shared = set(c.attrs) & last
        last_links.append(max(sorted(shared), key=rarity.idf) if shared else None)  # sorted: ties by name
    link_count = Counter(t for t in last_links if t is not None)
    n_hist = len(sets)

    def idf_sum(tokens: set[str]) -> float:
        # summed in sorted order: a set's order changes with PYTHONHASHSEED, and so would the float sum's last bits
        return sum(rarity.idf(t) for t in sorted(tokens))

    out = []
    for pos, c in enumerate(candidates):
        a = set(c.attrs)
        idfs = sorted(rarity.idf(t) for t in a)
        median = idfs[len(idfs) // 2] if idfs else 0.0

        def rarest(shared: set[str]) -> float:
            return max((rarity.idf(t) for t in shared), default=0.0)

        linked = [j for j, s in enumerate(sets) if a & s]
        rare_linked = [j for j, s in enumerate(sets) if any(rarity.idf(t) > median for t in a & s)]
        link = strongest_link(hist, c, rarity)
        cs = _sid_levels(c.sid)
        recent = sum(idf_sum(a & s) * RECENCY_DECAY ** (n_hist - 1 - j) for j, s in enumerate(sets))
        out.append([
            float(pos),
            rarest(a & last),
            idf_sum(a & last),
            rarest(a & last3),
            rarest(a & every),
            float(len(linked)),
            float(len(rare_linked)),
            float(link[1] if link else len(hist)),
            float(_shared_levels(cs, hist_sids[-1])) if hist_sids else 0.0,
            float(max((_shared_levels(cs, h) for h in hist_sids), default=0)),
            idfs[-1] if idfs else 0.0,
            float(link_count[last_links[pos]] - 1) if last_links[pos] is not None else 0.0,
            idf_sum(a & every),
            recent,
            float(sum(1 for s in sets for t in a & s if rarity.idf(t) > median)),
            rarity.idf(link[0]) if link else 0.0,
        ])
    # list-relative evidence: how the candidate's overlap compares with the other candidates'
    recents = [f[FEATURES.index("idf_recent")] for f in out]
    top = max(recents, default=0.0)
    order = sorted(range(len(recents)), key=lambda i: -recents[i])
    rank = {i: r for r, i in enumerate(order)}
    for i, f in enumerate(out):
        f += [float(rank[i]), top - recents[i]]
    return out


def check_features(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ``ValueError`` naming those that are not :data:`FEATURES` (or that none is given)."""
    names = tuple(names)
    unknown = [f for f in names if f not in FEATURES]
    if unknown or not names:
        raise ValueError((f"unknown feature(s) {unknown}" if unknown else "no feature named")
                         + f"; choose among {', '.join(FEATURES)}.")
    return names


def grouped_ranking(sids: Sequence[str], levels: Sequence[int]) -> list[str]:
    """``sids`` grouped by level, highest first, keeping their given (pre-rank) order inside a level."""
    if len(sids) != len(levels):
        raise ValueError(f"{len(sids)} candidates but {len(levels)} levels.")
    return [sids[i] for i in sorted(range(len(sids)), key=lambda i: -levels[i])]


@dataclass
class EvidenceRanker:
    """The procedure of the module docstring. Fit with :meth:`fit`; then :meth:`levels` / :meth:`ranking` per prompt.

    Args:
        rarity: attribute-token rarity from the training data.
        n_levels: integer levels a trace states (2 = promote / keep).
        max_iter, learning_rate, max_leaf_nodes: the boosted classifier's size. On ~20k Amazon lists, 400 trees of
            63 leaves gave the level ranking +1.5 R@1 on the valid split where 200 trees of 15 gave +0.4
            (``results/evidence_traces.md``).
        seed: the classifier's ``random_state``.
        scored: the :data:`FEATURES` the classifier reads (default: all). A trace states only a candidate's position
            and strongest link; with ``("position", "link_idf", "ago_linked")`` the level is a function of what the
            trace states, so a model that finds the link can compute its level, at the cost of the ranking's accuracy
            (``results/evidence_traces.md``).
    """

    rarity: AttributeRarity
    n_levels: int = 3
    max_iter: int = 400
    learning_rate: float = 0.05
    max_leaf_nodes: int = 63
    seed: int = 0
    scored: tuple[str, ...] = FEATURES
    thresholds: list[float] = field(default_factory=list)
    features: tuple[str, ...] = ()  # the FEATURES it was fitted on (a pickle outlives a change of them)
    _model: Any = None
    _folds: list[Any] = field(default_factory=list)

    def _classifier(self):
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=self.max_iter, learning_rate=self.learning_rate,
                                              max_leaf_nodes=self.max_leaf_nodes, early_stopping=False,
                                              random_state=self.seed)

    def __post_init__(self) -> None:
        self.scored = check_features(self.scored)

    def _columns(self, x):
        """The scored columns of a full feature matrix (every column when all :data:`FEATURES` are scored)."""
        if self.scored == FEATURES:
            return x
        return x[:, [FEATURES.index(f) for f in self.scored]]

    def _fit_one(self, feats: Sequence[list[list[float]]], targets: Sequence[int]):
        import numpy as np

        x = self._columns(np.array([f for ex in feats for f in ex], dtype=np.float64))
        y = np.array([int(c == t) for ex, t in zip(feats, targets) for c in range(len(ex))])
        if y.sum() == 0 or y.sum() == len(y):
            raise ValueError("EvidenceRanker.fit: the targets are all in one class; need lists with a target.")
        return self._classifier().fit(x, y)

    def _predict(self, model, feats: Sequence[list[list[float]]]) -> list[list[float]]:
        """Scores of many lists in one call (a call per list costs ~a millisecond per tree in scikit-learn)."""
        import numpy as np

        flat = [f for ex in feats for f in ex]
        if not flat:
            return [[] for _ in feats]
        proba = model.predict_proba(self._columns(np.array(flat, dtype=np.float64)))[:, 1].tolist()
        out, start = [], 0
        for ex in feats:
            out.append(proba[start : start + len(ex)])
            start += len(ex)
        return out

    def fit(self, rows: Sequence[tuple[Sequence[ItemText], Sequence[ItemText], int]],
            groups: Sequence[int] | None = None) -> EvidenceRanker:
        """Fit on ``(history, candidates, target index)`` rows of the train split.

        ``groups`` (e.g. user ids) assign rows to the two cross-fitting folds (``group % 2``; default: row index), so
        :meth:`out_of_fold_levels` can give each training row a level from the model that did not see it. The level
        thresholds are fitted on those out-of-fold scores.
        """
        if self.n_levels < 2:
            raise ValueError(f"n_levels must be >= 2, got {self.n_levels}.")
        if not rows:
            raise ValueError("EvidenceRanker.fit: no rows.")
        feats = [candidate_features(h, c, self.rarity) for h, c, _ in rows]
        targets = [t for _, _, t in rows]
        fold = [(g if groups is not None else i) % 2 for i, g in enumerate(groups or range(len(rows)))]
        self._model = self._fit_one(feats, targets)
        self._folds = []
        oof: list[list[float]] = [[] for _ in rows]
        for k in (0, 1):
            train = [i for i, f in enumerate(fold) if f != k]
            held = [i for i, f in enumerate(fold) if f == k]
            model = self._fit_one([feats[i] for i in train], [targets[i] for i in train])
            self._folds.append(model)
            for i, scores in zip(held, self._predict(model, [feats[i] for i in held])):
                oof[i] = scores
        self.thresholds = self._fit_thresholds(oof, targets)
        self.features = FEATURES
        return self

    def _fit_thresholds(self, scores: Sequence[Sequence[float]], targets: Sequence[int]) -> list[float]:
        """``n_levels - 1`` ascending cut points, from a grid of score quantiles, maximising R@1 + R@3 of the grouped
        ranking on the given (out-of-fold) scores."""
        import numpy as np

        if len({len(row) for row in scores}) != 1:  # ragged lists: pad with -inf (never above a real candidate)
            width = max(len(row) for row in scores)
            scores = [list(row) + [-math.inf] * (width - len(row)) for row in scores]
        s = np.array(scores, dtype=np.float64)  # [rows, candidates]
        t = np.array(targets)
        flat = s[np.isfinite(s)]
        grid = sorted(set(np.quantile(flat, np.linspace(0.5, 0.995, 12)).round(6).tolist()))
        cols = np.arange(s.shape[1])[None, :]
        best: tuple[int, list[float]] | None = None
        for cuts in combinations(grid, self.n_levels - 1):
            lv = np.searchsorted(np.array(cuts), s, side="right")  # [rows, candidates]
            lt = lv[np.arange(len(t)), t][:, None]
            rank = ((lv > lt) | ((lv == lt) & (cols < t[:, None]))).sum(1)
            hits = int((rank == 0).sum() + (rank < 3).sum())
            if best is None or hits > best[0]:
                best = (hits, list(cuts))
        return best[1]

    def _check(self) -> None:
        if self._model is None:
            raise RuntimeError("EvidenceRanker: call fit() or load() first.")

    def scores(self, history: Sequence[ItemText], candidates: Sequence[ItemText], fold: int | None = None) -> list[float]:
        """Probability that each candidate is the next purchase (``fold``: that cross-fitting model instead)."""
        return self.scores_many([(history, candidates)], None if fold is None else [fold])[0]

    def scores_many(self, lists: Sequence[tuple[Sequence[ItemText], Sequence[ItemText]]],
                    folds: Sequence[int | None] | None = None) -> list[list[float]]:
        """:meth:`scores` of many ``(history, candidates)`` lists at once (``folds[i]``: the model for list ``i``)."""
        self._check()
        if folds is not None and len(folds) != len(lists):
            raise ValueError(f"{len(lists)} lists but {len(folds)} folds.")
        folds = list(folds) if folds is not None else [None] * len(lists)
        feats = [candidate_features(h, c, self.rarity) for h, c in lists]
        out: list[list[float]] = [[] for _ in lists]
        for fold in set(folds):
            idx = [i for i, f in enumerate(folds) if f == fold]
            model = self._model if fold is None else self._folds[fold]
            for i, scores in zip(idx, self._predict(model, [feats[i] for i in idx])):
                out[i] = scores
        return out

    def levels_of(self, scores: Sequence[float]) -> list[int]:
        import bisect

        return [bisect.bisect_right(self.thresholds, s) for s in scores]

    def levels(self, history: Sequence[ItemText], candidates: Sequence[ItemText], fold: int | None = None) -> list[int]:
        """Each candidate's integer level in ``[0, n_levels)``."""
        return self.levels_of(self.scores(history, candidates, fold))

    def ranking(self, history: Sequence[ItemText], candidates: Sequence[ItemText], fold: int | None = None) -> list[str]:
        """The procedure's ranking: :func:`grouped_ranking` of the candidates' levels."""
        return grouped_ranking([c.sid for c in candidates], self.levels(history, candidates, fold))

    def score_ranking(self, history: Sequence[ItemText], candidates: Sequence[ItemText]) -> list[str]:
        """The continuous score's ranking (ties keep pre-rank order): the procedure's ceiling."""
        s = self.scores(history, candidates)
        return [candidates[i].sid for i in sorted(range(len(s)), key=lambda i: -s[i])]

    def save(self, path: str | Path) -> None:
        """Pickle the ranker (scikit-learn models have no other format); only load files you wrote."""
        from ..utils import atomic_write_bytes

        atomic_write_bytes(Path(path), pickle.dumps(self))

    @classmethod
    def load(cls, path: str | Path) -> EvidenceRanker:
        obj = pickle.loads(Path(path).read_bytes())
        if not isinstance(obj, cls):
            raise ValueError(f"{path} does not hold an EvidenceRanker.")
        names = tuple(getattr(obj, "features", ()) or ())  # empty in pickles written before the field existed
        scored = tuple(getattr(obj, "scored", FEATURES))
        obj.scored = scored
        width = getattr(obj._model, "n_features_in_", len(scored))
        if (names and names != FEATURES) or width != len(scored):
            raise ValueError(f"{path} holds an evidence ranker fitted on {width} features"
                             + (f" {list(names)}" if names else "") + f"; this version computes {len(FEATURES)} "
                             f"({list(FEATURES)}). Prepare the data again (`diffgr2 prepare --targets evidence`, or "
                             "the pipeline's prepare stage).")
        return obj
