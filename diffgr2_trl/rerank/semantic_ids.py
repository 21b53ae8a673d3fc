"""Semantic IDs: items written as GR2-style token tuples ``<a_12><b_7><c_190><d_3>``.

Built offline, deterministically given a seed:

1. :func:`item_embeddings` — one vector per item: a truncated SVD of the (degree-normalised, windowed) item
   co-occurrence matrix of the *training split* (no validation/test leakage), concatenated with an SVD of the
   idf-weighted item x attribute matrix. Each part is L2-normalised per item, so attributes carry a fixed share of
   the geometry and items that never occur in training (cold) still land next to their brand/category.
2. :func:`residual_kmeans` — ``n_residual_levels`` (default 3) rounds of k-means, each on the residual the previous
   round left, with ``codebook_size`` centroids per level (scikit-learn's seeded ``KMeans``, see :func:`kmeans`).
3. A last level resolves collisions, so every ID is unique and the mapping is invertible. ``last_level="rank"``
   writes the item's rank (by item id) among the items sharing the first three codes (TIGER's collision token):
   ~87% of items then get ``<d_0>``, and ``<d_1>``, ``<d_2>``, ... are rare tokens. ``"random"`` gives the items of
   a group distinct codes drawn uniformly from the codebook (seeded by the group's prefix), so every last-level
   token is as common as any other level's. A small model trained from scratch copies the rare rank tokens badly:
   in a ``mini`` teacher's invalid answers, 47 of 72 first wrong IDs differed only in that level, mostly ``<d_0>``
   against ``<d_1>`` or ``<d_2>`` both ways (``results/copy_learning.md``).

Attribute ids are written as ``<attr_N>`` tokens (:meth:`SemanticIds.attribute_tokens`).
"""

from __future__ import annotations

import json
import os
import re
import string
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

__all__ = ["SemanticIds", "item_embeddings", "kmeans", "residual_kmeans"]

_LEVEL_LETTERS = string.ascii_lowercase
LAST_LEVELS = ("rank", "random")
_TOKEN_RE = re.compile(r"<([a-z])_(\d+)>")


# ------------------------------------------------------------------------------------------------ embeddings


def _svd_embed(indices: np.ndarray, values: np.ndarray, shape: tuple[int, int], dim: int, seed: int) -> np.ndarray:
    """Rows of ``U * sqrt(S)`` from a randomized truncated SVD of a sparse matrix (torch, seeded)."""
    dim = max(1, min(dim, min(shape) - 1))
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        m = torch.sparse_coo_tensor(torch.from_numpy(indices), torch.from_numpy(values).double(), shape).coalesce()
        U, S, _ = torch.svd_lowrank(m, q=dim, niter=6)
    emb = (U * S.sqrt()).numpy()
    # Fix each component's sign (largest-magnitude entry positive) so the result does not depend on SVD internals.
    flip = np.sign(emb[np.abs(emb).argmax(0), np.arange(emb.shape[1])])
    return emb * np.where(flip == 0, 1, flip)


def _l2norm(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1, n)


def item_embeddings(
    train: dict[int, list[int]],
    item_attributes: dict[int, list[int]],
    n_items: int,
    cf_dim: int = 32,
    attr_dim: int = 16,
    attr_weight: float = 0.7,
    window: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """[n_items + 1, cf_dim + attr_dim] item vectors (row 0, padding, is zero). See the module docstring.

    ``attr_weight`` scales the (unit-norm) attribute part relative to the (unit-norm) co-occurrence part.
    """
    n = n_items + 1
    pairs: dict[tuple[int, int], float] = defaultdict(float)
    for s in train.values():
        for i, a in enumerate(s):
            for gap in range(1, window + 1):
                if i + gap >= len(s):
                    break
                b = s[i + gap]
                if a != b:
                    pairs[(a, b)] += 1.0 / gap
                    pairs[(b, a)] += 1.0 / gap
    parts = []
    if pairs:
        idx = np.array(list(pairs.keys()), dtype=np.int64).T
        val = np.array(list(pairs.values()))
        deg = np.bincount(idx[0], weights=val, minlength=n)
        val = val / np.sqrt(deg[idx[0]] * deg[idx[1]])  # symmetric normalisation: popular items do not dominate
        parts.append(_l2norm(_svd_embed(idx, val, (n, n), cf_dim, seed)))
    rows, cols = [], []
    for item, attrs in item_attributes.items():
        for a in set(attrs):
            rows.append(item)
            cols.append(a)
    if rows:
        rows_a, cols_a = np.array(rows), np.array(cols)
        n_attr = int(cols_a.max()) + 1
        df = np.bincount(cols_a, minlength=n_attr)
        val = np.log((len(item_attributes) + 1) / df[cols_a])  # idf: a shared top category says little
        parts.append(attr_weight * _l2norm(_svd_embed(np.stack([rows_a, cols_a]), val, (n, n_attr), attr_dim, seed)))
    if not parts:
        raise ValueError("no training co-occurrences and no attributes: nothing to embed")
    emb = np.concatenate(parts, axis=1).astype(np.float64)
    emb[0] = 0.0
    return emb


# ---------------------------------------------------------------------------------------------------- k-means


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (scikit-learn's ``KMeans``: greedy k-means++ initialisation, Lloyd iterations until no point
    moves or ``iters`` rounds). Returns ``(centroids [k', d], assignment [n])``.

    ``k' = min(k, number of distinct points)``. scikit-learn moves a cluster that empties during the iterations to a
    point far from its centroid, so every code stays in use while there are enough points (every code at every level
    on the Amazon data we measured; the final assignment is to the nearest centroid, so that is not a hard guarantee).

    Runs on one OpenMP thread: the centroid sums are reduced across threads in whatever order they finish, which
    moves centroids in the last bit (~1e-16) and could flip a tie on a later residual level, so the
    semantic IDs would depend on the machine. One thread is also faster for catalogues of ~10k items (2 s vs 8 s
    for three levels on two shared cores).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    k = min(k, len(np.unique(x, axis=0)))
    with threadpool_limits(limits=1):
        km = KMeans(
            n_clusters=k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, random_state=seed, algorithm="lloyd"
        ).fit(x)
    return km.cluster_centers_, km.labels_.astype(np.int64)


def residual_kmeans(x: np.ndarray, codebook_size: int, n_levels: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """[n, n_levels] codes; level ``l`` clusters the residual left by levels ``< l``."""
    residual = x.copy()
    codes = np.zeros((len(x), n_levels), dtype=np.int64)
    for level in range(n_levels):
        c, a = kmeans(residual, codebook_size, seed=seed + level, iters=iters)
        codes[:, level] = a
        residual = residual - c[a]
    return codes


# ------------------------------------------------------------------------------------------------ SemanticIds


def _carriers(item_attributes: dict[int, list[int]]) -> Counter:
    """How many items carry each attribute id: the rarity both :func:`rarest_first` and :func:`rarity_classes` use."""
    return Counter(a for attrs in item_attributes.values() for a in set(attrs))


def rarest_first(item_attributes: dict[int, list[int]]) -> dict[int, list[int]]:
    """Each item's attribute ids reordered rarest first: by how many items carry the attribute (in
    ``item_attributes``), ties kept in file order. A prompt then shows which of an item's tokens are telling, which it
    cannot otherwise show; what that did for a small teacher is in ``results/evidence_traces.md``."""
    counts = _carriers(item_attributes)
    return {item: sorted(attrs, key=lambda a, order=attrs: (counts[a], order.index(a)))
            for item, attrs in item_attributes.items()}


def rarity_classes(item_attributes: dict[int, list[int]], n_classes: int) -> dict[int, int]:
    """Each attribute id's rarity class, ``0`` (rarest) to ``n_classes - 1`` (commonest), for the ``<rare_K>`` mark a
    prompt writes after the attribute's token (``prepare --rarity_marks``).

    Attributes are ordered by how many items carry them and cut into classes holding equal shares of the catalogue's
    attribute occurrences, so each mark is shown about equally often; attributes carried by equally many items share
    a class. The order inside an item's line shows only which of its tokens is rarer; the mark shows how rare.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}.")
    counts = _carriers(item_attributes)
    total = sum(counts.values())
    below, cls_of_count = 0, {}
    for c, n_attrs in sorted(Counter(counts.values()).items()):  # occurrences of strictly rarer ones decide the class
        cls_of_count[c] = min(n_classes - 1, n_classes * below // total)
        below += c * n_attrs
    return {a: cls_of_count[c] for a, c in sorted(counts.items())}


class SemanticIds:
    """Bijective map between item ids and semantic-ID strings, plus attribute tokens.

    Args:
        codes: ``item_id -> (c_1, ..., c_L)``, all tuples distinct (the last level already resolves collisions).
        codebook_size: tokens per level (``<a_0>`` .. ``<a_{codebook_size - 1}>``, likewise ``b``, ``c``, ...).
        item_attributes: ``item_id -> [attribute_id, ...]`` for :meth:`attribute_tokens`.
        stats: build statistics (uniqueness before the last level, utilisation per level, ...).
        rarity_marks: ``attribute_id -> class`` (:func:`rarity_classes`); each attribute token is then followed by
            ``<rare_K>``, K its class. Every attribute of ``item_attributes`` needs one.
    """

    def __init__(
        self,
        codes: dict[int, tuple[int, ...]],
        codebook_size: int,
        item_attributes: dict[int, list[int]] | None = None,
        stats: dict | None = None,
        rarity_marks: dict[int, int] | None = None,
    ):
        self.codes = {int(i): tuple(int(v) for v in c) for i, c in codes.items()}
        self.codebook_size = codebook_size
        self.n_levels = len(next(iter(self.codes.values())))
        self.item_attributes = {int(i): list(a) for i, a in (item_attributes or {}).items()}
        self.stats = stats or {}
        self.rarity_marks = {int(a): int(k) for a, k in (rarity_marks or {}).items()}
        if self.rarity_marks:
            missing = {a for v in self.item_attributes.values() for a in v} - set(self.rarity_marks)
            if missing:
                raise ValueError(f"rarity_marks has no class for attribute ids {sorted(missing)[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}.")
        self._sid = {i: self._format(c) for i, c in self.codes.items()}
        self._item = {s: i for i, s in self._sid.items()}
        if len(self._item) != len(self._sid):
            raise ValueError("semantic IDs are not unique")
        if any(v >= codebook_size or v < 0 for c in self.codes.values() for v in c):
            raise ValueError(f"a code is outside [0, {codebook_size})")

    @staticmethod
    def _format(code: tuple[int, ...]) -> str:
        return "".join(f"<{_LEVEL_LETTERS[lvl]}_{v}>" for lvl, v in enumerate(code))

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        item_ids: list[int],
        codebook_size: int = 256,
        n_residual_levels: int = 3,
        item_attributes: dict[int, list[int]] | None = None,
        seed: int = 0,
        kmeans_iters: int = 30,
        last_level: str = "rank",
        rarity_marks: dict[int, int] | None = None,
    ) -> SemanticIds:
        """Residual k-means over ``embeddings[item_ids]`` plus a collision-resolving last level (``"rank"`` or
        ``"random"``, see the module docstring)."""
        if last_level not in LAST_LEVELS:
            raise ValueError(f"last_level must be one of {LAST_LEVELS}, got {last_level!r}.")
        item_ids = sorted(int(i) for i in item_ids)
        # Rounding absorbs last-bit float differences (BLAS thread count, SVD internals) that would otherwise flip
        # k-means ties and change IDs between machines; 6 decimals is far below any meaningful distance.
        x = np.round(np.asarray(embeddings, dtype=np.float64)[item_ids], 6)
        codes = residual_kmeans(x, codebook_size, n_residual_levels, seed=seed, iters=kmeans_iters)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for item, c in zip(item_ids, map(tuple, codes.tolist())):
            groups[c].append(item)  # item_ids sorted, so the rank inside a group is by item id
        max_group = max(len(g) for g in groups.values())
        if max_group > codebook_size:
            raise ValueError(
                f"{max_group} items share one {n_residual_levels}-level code but the last level has only "
                f"{codebook_size} values; raise codebook_size or n_residual_levels"
            )
        if last_level == "rank":
            full = {item: (*prefix, rank) for prefix, g in groups.items() for rank, item in enumerate(g)}
        else:  # seeded by the prefix itself, so an item's code does not depend on the order groups are visited in
            full = {}
            for prefix, g in groups.items():
                codes_g = np.random.default_rng([seed, *prefix]).choice(codebook_size, size=len(g), replace=False)
                full.update({item: (*prefix, int(c)) for item, c in zip(g, codes_g)})
        stats = {
            "items": len(item_ids),
            "codebook_size": codebook_size,
            "levels": n_residual_levels + 1,
            "unique_before_last_level": sum(len(g) == 1 for g in groups.values()) / len(item_ids),
            "distinct_prefixes": len(groups),
            "max_items_per_prefix": max_group,
            "utilisation_per_level": [
                len(np.unique(codes[:, lvl])) / codebook_size for lvl in range(n_residual_levels)
            ]
            + [max_group / codebook_size],
            "seed": seed,
            "last_level": last_level,
        }
        return cls(full, codebook_size, item_attributes, stats, rarity_marks)

    # -- mapping -----------------------------------------------------------------------------------------------

    def encode(self, item_id: int) -> str:
        """``item_id -> "<a_12><b_7><c_190><d_3>"``. Raises ``KeyError`` for an unknown item."""
        return self._sid[int(item_id)]

    def decode(self, sid: str) -> int:
        """Inverse of :meth:`encode` (surrounding whitespace ignored). Raises ``KeyError`` for an unknown ID."""
        return self._item[sid.strip()]

    def find_all(self, text: str) -> list[int | None]:
        """Every complete semantic ID in ``text``, in order, decoded (``None`` where well-formed but unknown)."""
        pat = "".join(rf"<{_LEVEL_LETTERS[lvl]}_\d+>" for lvl in range(self.n_levels))
        return [self._item.get(m) for m in re.findall(pat, text)]

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.codes

    def items(self) -> list[int]:
        return sorted(self.codes)

    # -- tokens ------------------------------------------------------------------------------------------------

    def tokens(self) -> list[str]:
        """All level tokens ``<a_0> .. <a_{K-1}>, <b_0> ..`` (``K = codebook_size`` per level) for a tokenizer."""
        return [f"<{_LEVEL_LETTERS[lvl]}_{v}>" for lvl in range(self.n_levels) for v in range(self.codebook_size)]

    def attribute_tokens(self, item_id: int) -> list[str]:
        """``<attr_N>`` tokens of the item's attributes (brand / category ids), in the order ``item_attributes`` lists
        them; with ``rarity_marks`` each is ``<attr_N><rare_K>``, one string (the evidence features see one token)."""
        marks = self.rarity_marks
        return [f"<attr_{a}>" + (f"<rare_{marks[a]}>" if marks else "") for a in self.item_attributes.get(int(item_id), [])]

    def attribute_vocab(self) -> list[str]:
        """Every ``<attr_N>`` token that occurs, sorted by N, then the ``<rare_K>`` marks in use (add these to a
        tokenizer too)."""
        attrs = sorted({a for v in self.item_attributes.values() for a in v})
        return [f"<attr_{a}>" for a in attrs] + [f"<rare_{k}>" for k in sorted({self.rarity_marks[a] for a in attrs}
                                                                             if self.rarity_marks else ())]

    # -- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """JSON: codebook size, ``item -> codes``, ``item -> attributes``, build stats."""
        data = {
            "codebook_size": self.codebook_size,
            "codes": {str(i): list(c) for i, c in sorted(self.codes.items())},
            "item_attributes": {str(i): a for i, a in sorted(self.item_attributes.items())},
            "stats": self.stats,
            **({"rarity_marks": {str(a): k for a, k in sorted(self.rarity_marks.items())}} if self.rarity_marks else {}),
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SemanticIds:
        data = json.loads(Path(path).read_text())
        return cls(
            {int(i): tuple(c) for i, c in data["codes"].items()},
            data["codebook_size"],
            {int(i): a for i, a in data["item_attributes"].items()},
            data.get("stats"),
            {int(a): k for a, k in data.get("rarity_marks", {}).items()},
        )
