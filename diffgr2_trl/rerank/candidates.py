"""Re-ranking examples and the one-call data preparation (``prepare_data`` / ``load_prepared``).

An example is a user whose held-out target is in the pre-ranker's top ``n_candidates`` (10); the candidates keep
the pre-ranker's order, so the pre-rank order's R@k / N@k over the kept examples is the floor a re-ranker must beat.

Per split (see :class:`diffgr2_trl.rerank.data.Split`):

- ``train``: target = the user's last *training* item, history = the training items before it, candidates from the
  pre-ranker run on that history. (The pre-ranker was fitted on this item, so train candidates are easier than
  valid/test ones; they are for teaching a re-ranker, not for measuring it.)
- ``valid``: history = the sequence without its last two items, target = the second-to-last item.
- ``test``: history = the sequence without its last item, target = the last item.

Output directory written by :func:`prepare_data` (atomically: a temporary sibling directory renamed into place)::

    stats.json          dataset statistics + loader skip counts
    prerank.json        full-ranking HR@10/NDCG@10 per pre-ranker and split, which one was used, fraction of users
                        with the target in the top 10, floor R@k/N@k per split, timings
    semantic_ids.json   SemanticIds.save()
    train.jsonl / valid.jsonl / test.jsonl
                        {"user_id": int, "history": [int], "candidates": [int], "target": int} per line
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import dataset_stats, leave_one_out, load_sequence_data, stats_to_json
from .metrics import rank_of, summarize_ranks
from .prerank import (
    PopularityPreRanker,
    SASRecConfig,
    SASRecPreRanker,
    TransitionPreRanker,
    evaluate_full_ranking,
    recommend,
)
from .semantic_ids import SemanticIds, item_embeddings, rarest_first, rarity_classes

__all__ = ["PreparedData", "SPLITS", "build_examples", "load_prepared", "load_train_sequences", "prepare_data", "read_jsonl", "write_jsonl"]

SPLITS = ("train", "valid", "test")
TRAIN_SEQUENCES = "train_sequences.json"


@dataclass
class PreparedData:
    """Everything a re-ranker needs, as written by :func:`prepare_data` and read by :func:`load_prepared`.

    Attributes:
        out_dir: where it lives on disk.
        stats: dataset statistics (``stats.json``).
        prerank: pre-ranker metrics and provenance (``prerank.json``).
        semantic_ids: item <-> semantic-ID map with attribute tokens.
        examples: ``{"train"|"valid"|"test": [{"user_id", "history", "candidates", "target"}, ...]}``.
    """

    out_dir: Path
    stats: dict
    prerank: dict
    semantic_ids: SemanticIds
    examples: dict[str, list[dict]] = field(default_factory=dict)


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


TRAIN_ROWS = ("all_prefixes", "last")


def _split_inputs(split, name: str, train_rows: str = "all_prefixes"):
    """(users, histories, targets, held_out) a pre-ranker sees for one split.

    ``train``: every prefix of each user's training items (``train_rows="all_prefixes"``: item ``i`` is the target of
    ``items[:i]`` for every ``i >= 1``) or only the last one (``"last"``). ``held_out`` pairs each train history with its
    full training sequence and cut, so the pre-ranker can drop the user's own transitions from ``i`` on
    (leave-one-out): the target's pre-rank position then follows the valid/test distribution. valid/test: ``None``.
    """
    if name == "train":
        if train_rows not in TRAIN_ROWS:
            raise ValueError(f"train_rows must be one of {TRAIN_ROWS}, got {train_rows!r}.")
        users, hists, targets, held_out = [], [], [], []
        for u, seq in split.train.items():
            cuts = range(1, len(seq)) if train_rows == "all_prefixes" else range(len(seq) - 1, len(seq))
            for i in cuts:
                if i < 1:
                    continue
                users.append(u)
                hists.append(seq[:i])
                targets.append(seq[i])
                held_out.append((seq, i))
        return users, hists, targets, held_out
    pairs = getattr(split, name)
    users = list(pairs)
    return users, [pairs[u][0] for u in users], [pairs[u][1] for u in users], None


def build_examples(
    users: list[int],
    histories: list[list[int]],
    targets: list[int],
    candidates: np.ndarray,
    history_len: int = 20,
) -> tuple[list[dict], list[int | None]]:
    """Keep users whose target is among their candidates; return ``(examples, all users' target ranks)``."""
    examples, ranks = [], []
    for u, h, t, c in zip(users, histories, targets, candidates.tolist()):
        r = rank_of(t, c)
        ranks.append(r)
        if r is not None:
            examples.append({"user_id": u, "history": h[-history_len:], "candidates": c, "target": t})
    return examples, ranks


def _make_preranker(name: str, n_items: int, seed: int, sasrec_config: SASRecConfig | None, progress: bool):
    if name == "transition":
        return TransitionPreRanker(n_items)
    if name == "sasrec":
        cfg = sasrec_config or SASRecConfig()
        cfg.seed = seed
        return SASRecPreRanker(n_items, cfg, progress=progress)
    if name == "popularity":
        return PopularityPreRanker(n_items)
    raise ValueError(f"unknown pre-ranker {name!r}; choose from transition, sasrec, popularity")


def prepare_data(
    data_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    seed: int = 0,
    name: str | None = None,
    prerankers: tuple[str, ...] = ("transition", "sasrec"),
    sasrec_config: SASRecConfig | None = None,
    n_candidates: int = 10,
    history_len: int = 20,
    codebook_size: int = 256,
    n_residual_levels: int = 3,
    sid_last_level: str = "rank",
    attribute_order: str = "file",
    rarity_marks: int = 0,
    train_rows: str = "all_prefixes",
    progress: bool = True,
    provenance: dict | None = None,
    allow_truncated: bool = False,
) -> PreparedData:
    """Load, split, fit pre-rankers, build candidates / examples and semantic IDs; save to ``out_dir``.

    Args:
        data_dir: directory with ``{name}.txt`` (``None``: see :func:`~diffgr2_trl.rerank.data.locate_data_dir`).
        name: dataset file stem; ``None`` infers it from the one ``NAME.txt`` + ``NAME_item2attributes.json`` pair.
        out_dir: output directory; replaced atomically if it exists.
        seed: seeds SASRec, the SVD and k-means.
        prerankers: pre-rankers to fit and report; the one with the best validation NDCG@10 makes the candidates.
        sasrec_config: SASRec hyper-parameters (its seed is overwritten by ``seed``).
        n_candidates: candidates per example.
        history_len: history items kept per example (most recent).
        codebook_size: semantic-ID tokens per level.
        n_residual_levels: residual k-means levels before the collision-resolving level.
        sid_last_level: how that level resolves collisions, ``"rank"`` or ``"random"``
            (:meth:`~diffgr2_trl.rerank.semantic_ids.SemanticIds.build`).
        attribute_order: the order of an item's attribute tokens wherever it is shown: ``"file"`` (as the
            dataset lists them) or ``"rarity"`` (rarest first, :func:`~diffgr2_trl.rerank.semantic_ids.rarest_first`).
        rarity_marks: follow every attribute token with ``<rare_K>``, its rarity class of this many
            (:func:`~diffgr2_trl.rerank.semantic_ids.rarity_classes`, counted over the catalogue); 0: no marks.
        train_rows: ``"all_prefixes"`` (every prefix of every user's training items, scored leave-one-out) or
            ``"last"`` (one row per user, its last training item).
        progress: tqdm bars for SASRec training.
        allow_truncated: accept a sequences file whose last line was cut (see
            :func:`~diffgr2_trl.rerank.data.load_sequences`).
        provenance: what produced this directory (options, data digests), recorded in ``prerank.json`` as ``inputs``.

    Returns:
        The :class:`PreparedData` that was written.
    """
    if attribute_order not in ("file", "rarity"):
        raise ValueError(f"attribute_order must be 'file' or 'rarity', got {attribute_order!r}.")
    if rarity_marks < 0:
        raise ValueError(f"rarity_marks must be >= 0 (0: no marks), got {rarity_marks}.")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(key: str, t0: float) -> None:
        timings[key] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    data = load_sequence_data(data_dir, name, allow_truncated=allow_truncated)
    split = leave_one_out(data.sequences)
    stats = dataset_stats(data.sequences, data.item_attributes)
    print(f"prepare: loaded {stats['users']} users, {stats['items']} items ({time.perf_counter() - t0:.0f} s)", flush=True)
    lap("load_split", t0)

    inputs = {s: _split_inputs(split, s, train_rows) for s in SPLITS}
    full_ranking: dict[str, dict] = {}
    models = {}
    for pr in prerankers:
        t0 = time.perf_counter()
        model = _make_preranker(pr, data.n_items, seed, sasrec_config, progress).fit(split.train)
        models[pr] = model
        full_ranking[pr] = {
            s: evaluate_full_ranking(model, inputs[s][1], inputs[s][2], k=n_candidates) for s in ("valid", "test")
        }
        if isinstance(model, SASRecPreRanker):
            full_ranking[pr]["config"] = model.config_dict()
            full_ranking[pr]["train_log"] = model.train_log
        print(f"prepare: pre-ranker {pr} fitted, valid NDCG@{n_candidates} "
              f"{full_ranking[pr]['valid'][f'NDCG@{n_candidates}']:.4f}", flush=True)
        lap(f"prerank_{pr}", t0)
    ndcg_key = f"NDCG@{n_candidates}"
    # Leave-one-out training rows need a pre-ranker that can drop a user's own future; the others are still
    # fitted and reported, but cannot make the candidates then.
    eligible = [p for p in prerankers if train_rows == "last" or getattr(models[p], "supports_held_out", False)]
    if not eligible:
        raise ValueError(f"train_rows='all_prefixes' needs a leave-one-out pre-ranker (transition) among {prerankers}; "
                         "add it, or pass train_rows='last'.")
    chosen = max(eligible, key=lambda p: full_ranking[p]["valid"][ndcg_key])
    loo = getattr(models[chosen], "supports_held_out", False)

    t0 = time.perf_counter()
    examples: dict[str, list[dict]] = {}
    per_split: dict[str, dict] = {}
    for s in SPLITS:
        users, hists, targets, held_out = inputs[s]
        if not loo:  # train_rows="last" with a pre-ranker that cannot leave one out: the old, optimistic candidates
            held_out = None
        cands = recommend(models[chosen], hists, k=n_candidates, held_out=held_out)
        examples[s], ranks = build_examples(users, hists, targets, cands, history_len)
        kept = [r for r in ranks if r is not None]
        per_split[s] = {
            "users": len(users),
            "examples": len(examples[s]),
            "fraction_target_in_top": len(kept) / max(len(users), 1),
            "floor": summarize_ranks(kept),
        }
    lap("candidates", t0)

    t0 = time.perf_counter()
    emb = item_embeddings(split.train, data.item_attributes, data.n_items, seed=seed)
    sids = SemanticIds.build(
        emb,
        list(data.item_attributes),
        codebook_size=codebook_size,
        n_residual_levels=n_residual_levels,
        item_attributes=rarest_first(data.item_attributes) if attribute_order == "rarity" else data.item_attributes,
        seed=seed,
        last_level=sid_last_level,
        rarity_marks=rarity_classes(data.item_attributes, rarity_marks) if rarity_marks else None,
    )
    lap("semantic_ids", t0)
    timings["total"] = round(time.perf_counter() - t_start, 1)

    prerank = {
        "chosen": chosen,
        "selection": f"best validation {ndcg_key}" + ("" if train_rows == "last" else " among leave-one-out pre-rankers"),
        "n_candidates": n_candidates,
        "history_len": history_len,
        "full_ranking": full_ranking,
        "splits": per_split,
        "semantic_ids": sids.stats,
        "timings_s": timings,
        "seed": seed,
        "train_rows": train_rows,
        **({"inputs": provenance} if provenance is not None else {}),
        "train_candidates": "leave-one-out (the user's own transitions from the target on are removed)" if loo
        else "from the pre-ranker fitted on the target's own transition (optimistic)",
        "torch_threads": torch.get_num_threads(),
    }
    print(f"prepare: candidates and semantic IDs done ({timings['total']:.0f} s)", flush=True)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "stats.json").write_text(json.dumps(stats_to_json(stats, data.report), indent=2) + "\n")
        (tmp / "prerank.json").write_text(json.dumps(prerank, indent=2) + "\n")
        sids.save(tmp / "semantic_ids.json")
        for s in SPLITS:
            write_jsonl(examples[s], tmp / f"{s}.jsonl")
        # Training sequences (never valid/test items): what SID mid-training builds its tasks from.
        (tmp / TRAIN_SEQUENCES).write_text(json.dumps({str(u): seq for u, seq in split.train.items()}) + "\n")
        if out_dir.exists():  # swap: the old directory is removed only once the new one is complete
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData(out_dir, stats, prerank, sids, examples)


def load_train_sequences(out_dir: str | os.PathLike) -> dict[int, list[int]]:
    """The training item sequences :func:`prepare_data` saved (``{user_id: [item, ...]}``, time order)."""
    path = Path(out_dir) / TRAIN_SEQUENCES
    if not path.is_file():
        raise FileNotFoundError(f"No {TRAIN_SEQUENCES} in {out_dir}; re-run `diffgr2 prepare --overwrite`.")
    return {int(u): seq for u, seq in json.loads(path.read_text()).items()}


def load_prepared(out_dir: str | os.PathLike) -> PreparedData:
    """Read what :func:`prepare_data` wrote."""
    out_dir = Path(out_dir)
    if not (out_dir / "prerank.json").is_file():
        raise FileNotFoundError(f"{out_dir} is not a prepared-data directory (no prerank.json); run prepare_data")
    stats = json.loads((out_dir / "stats.json").read_text())
    stats.pop("load_report", None)
    return PreparedData(
        out_dir,
        stats,
        json.loads((out_dir / "prerank.json").read_text()),
        SemanticIds.load(out_dir / "semantic_ids.json"),
        {s: read_jsonl(out_dir / f"{s}.jsonl") for s in SPLITS},
    )
