"""Prompt/completion datasets for the re-ranker, built from a :func:`~diffgr2_trl.rerank.candidates.prepare_data`
directory, plus the local tokenizer trained on them (``diffgr2 prepare`` runs :func:`build_pipeline_data`).

Layout added under the prepared directory ``DIR`` (everything written atomically, in a temporary sibling renamed
into place, so an interrupted run never leaves a half-written directory that a later run would trust)::

    DIR/stats.json, prerank.json, semantic_ids.json, {train,valid,test}.jsonl   (prepare_data, examples)
    DIR/datasets/{train,valid,test}/        datasets.Dataset.save_to_disk
    DIR/datasets/{train,valid,test}.jsonl   the same rows, for reading with one's eyes (and ``trl`` CLIs)
    DIR/tokenizer/                          the local BPE tokenizer (tokenizer.train_rerank_tokenizer)
    DIR/evidence_ranker.pkl                 with targets="evidence": the fitted procedure the traces follow
    DIR/summary.json                        statistics, pre-rank floor, token lengths; its presence marks "complete"

Columns of every split: ``prompt`` (plain text), ``completion`` (offline trace + target ranking, canonical JSON),
``candidates`` (SIDs in pre-rank order), ``target`` (SID), ``answer_start``, ``user_id``.

``answer_start`` is the character offset in ``completion`` of the ``", "recommendations": ["`` piece that opens the
answer list. It is the first answer *token* (the local tokenizer makes that piece one added token), so splitting the
completion there is a token boundary: what CFT needs to weight reasoning and answer tokens separately
(:class:`~diffgr2_trl.trainers.cft.CFTConfig`'s ``answer_start_column``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .candidates import SPLITS, PreparedData, load_prepared, write_jsonl
from .evidence import AttributeRarity, EvidenceRanker
from .metrics import summarize_ranks
from .prompts import RECOMMENDATIONS_OPEN, build_rerank_row, parse_prompt, to_items
from .semantic_ids import SemanticIds
from .traces import TARGET_RULES, evidence_completion, offline_explanation, supported_ranking

__all__ = [
    "COLUMNS",
    "build_pipeline_data",
    "build_rows",
    "fit_evidence_ranker",
    "is_complete",
    "load_split",
    "load_tokenizer",
    "match_target_positions",
    "token_lengths",
]

COLUMNS = ("prompt", "completion", "candidates", "target", "answer_start", "user_id")
SUMMARY = "summary.json"
EVIDENCE_RANKER = "evidence_ranker.pkl"


def completion_copy_rate(rows: Sequence[dict]) -> float:
    """Share of rows whose completion ranks the candidates in their pre-rank order (the "copy the input" rate of a
    split's training rankings; :func:`~.metrics.copy_rate` over the parsed completions)."""
    from .metrics import copy_rate
    from .parsing import parse_ranking

    rankings = [parse_ranking(r["completion"], r["candidates"]) for r in rows]
    return copy_rate([p.ranking if p.valid else None for p in rankings], [r["candidates"] for r in rows]) or 0.0


def build_rows(
    examples: Sequence[dict], sids: SemanticIds, max_history: int | None = 20, progress: bool = False, desc: str = "",
    id_line: bool = True, targets: str = "label", ranker: EvidenceRanker | None = None, cross_fitted: bool = False,
    store: str | None = None,
) -> list[dict[str, Any]]:
    """Dataset rows (see the module docstring) for ``{"user_id", "history", "candidates", "target"}`` examples.

    ``targets``: the completions' rankings, ``label`` (the true next item first, :func:`~.prompts.target_ranking`),
    ``supported`` (only where the prompt's evidence singles it out, :func:`~.traces.supported_ranking`) or
    ``evidence`` (``ranker``'s label-free ranking with its evidence trace, :func:`~.traces.evidence_completion`).
    ``cross_fitted``: the examples are ``ranker``'s own training rows, so each row's trace comes from the cross-fitting
    model that did not see it (fold ``user_id % 2``). ``store``: what the prompt's role line says is sold.
    """
    if targets not in TARGET_RULES:
        raise ValueError(f"targets must be one of {TARGET_RULES}, got {targets!r}.")
    if targets == "evidence" and ranker is None:
        raise ValueError("targets='evidence' needs a fitted EvidenceRanker (ranker=...).")
    ranking = supported_ranking if targets == "supported" else None
    levels: list[list[int]] = []
    if targets == "evidence":  # scored in one batch: per-list calls into scikit-learn cost ~1 ms per tree each
        shown = [(to_items(list(ex["history"])[-max_history:] if max_history else ex["history"], sids.encode,
                           sids.attribute_tokens), to_items(ex["candidates"], sids.encode, sids.attribute_tokens))
                 for ex in examples]
        folds = [int(ex["user_id"]) % 2 for ex in examples] if cross_fitted else None
        levels = [ranker.levels_of(s) for s in ranker.scores_many(shown, folds)]
    rows = []
    for i, ex in enumerate(tqdm(examples, desc=desc or "rows", disable=not progress, leave=False)):
        if targets == "evidence":
            row = build_rerank_row(ex, sids.encode, sids.attribute_tokens, max_history, id_line=id_line, store=store)
            history, cands = parse_prompt(row["prompt"])
            row["completion"], _ = evidence_completion(history, cands, ranker, levels=levels[i])
        else:
            row = build_rerank_row(ex, sids.encode, sids.attribute_tokens, max_history, explanation=offline_explanation,
                                   id_line=id_line, ranking=ranking, store=store)
        row["answer_start"] = row["completion"].index(RECOMMENDATIONS_OPEN)
        row["user_id"] = int(ex["user_id"])
        rows.append({k: row[k] for k in COLUMNS})
    return rows


def fit_evidence_ranker(prepared: PreparedData, max_history: int | None = 20, n_levels: int = 3,
                        seed: int = 0, scored: Sequence[str] | None = None) -> EvidenceRanker:
    """Fit :class:`~.evidence.EvidenceRanker` on the prepared train split, with attribute rarity from the training
    sequences' items. Prompts show at most ``max_history`` history items, so the features see exactly those.
    ``scored``: the features its classifier reads (None: all)."""
    from .candidates import load_train_sequences

    sids = prepared.semantic_ids
    items = {i for seq in load_train_sequences(prepared.out_dir).values() for i in seq}
    rarity = AttributeRarity.from_items(sids.attribute_tokens(i) for i in sorted(items))
    rows, groups = [], []
    for ex in prepared.examples["train"]:
        history = to_items(list(ex["history"])[-max_history:] if max_history else ex["history"], sids.encode,
                           sids.attribute_tokens)
        cands = to_items(ex["candidates"], sids.encode, sids.attribute_tokens)
        rows.append((history, cands, list(ex["candidates"]).index(ex["target"])))
        groups.append(int(ex["user_id"]))
    extra = {"scored": tuple(scored)} if scored else {}
    return EvidenceRanker(rarity, n_levels=n_levels, seed=seed, **extra).fit(rows, groups)


def token_lengths(tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Mean / p50 / p95 / max token count of ``texts`` (no special tokens)."""
    if not texts:
        return {"n": 0}
    lens = sorted(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return {
        "n": len(lens),
        "mean": round(statistics.fmean(lens), 1),
        "p50": lens[len(lens) // 2],
        "p95": lens[min(len(lens) - 1, int(0.95 * len(lens)))],
        "max": lens[-1],
    }


def match_target_positions(
    examples: Sequence[dict], reference: Sequence[dict], seed: int = 0
) -> list[dict]:
    """Subsample ``examples`` so the pre-rank position of their target follows ``reference``'s histogram.

    Why: train candidates come from a pre-ranker fitted on exactly those transitions, so the target is first in
    50% of train examples against 34% on valid/test (results/data_prerank.md). A re-ranker trained on the raw split
    learns "keep the first candidate" as a prior calibrated for the wrong distribution. Keeping each example with
    probability proportional to ``p_ref(position) / p_train(position)`` (the largest ratio kept with probability 1)
    removes that label shift; only held-out *positions* of the reference split are used, never its items.
    """
    import random

    def hist(rows: Sequence[dict]) -> Counter:
        return Counter(r["candidates"].index(r["target"]) for r in rows)

    h_ex, h_ref = hist(examples), hist(reference)
    if not h_ref or not h_ex:
        return list(examples)
    ratio = {k: (h_ref[k] / len(reference)) / (h_ex[k] / len(examples)) for k in h_ex}
    top = max(ratio.values())
    rng = random.Random(seed)
    return [r for r in examples if rng.random() < ratio[r["candidates"].index(r["target"])] / top]


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished :func:`build_pipeline_data` output."""
    d = Path(out_dir)
    return (d / SUMMARY).is_file() and (d / "tokenizer").is_dir() and all((d / "datasets" / s).is_dir() for s in SPLITS)


def build_pipeline_data(
    prepared: PreparedData,
    max_history: int | None = 20,
    max_train_examples: int | None = None,
    vocab_size: int = 2048,
    tokenizer_texts: int = 20000,
    match_positions: str | None = None,
    seed: int = 0,
    progress: bool = True,
    mid_rows: int = 0,
    mid_mix: str | None = None,
    id_line: bool = True,
    targets: str = "label",
    provenance: dict | None = None,
    evidence_levels: int = 3,
    store: str | None = None,
    evidence_features: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write datasets, JSONL copies, the tokenizer and ``summary.json`` into ``prepared.out_dir`` (atomically).

    Args:
        prepared: what :func:`~diffgr2_trl.rerank.candidates.prepare_data` returned (or ``load_prepared``).
        max_train_examples: keep this many train examples (a seeded random subset; ``None``: all).
        match_positions: subsample train so its target-position histogram matches this split's
            (:func:`match_target_positions`); ``None`` keeps the raw train split.
        vocab_size: BPE merges of the local tokenizer (SID/attribute/format tokens come on top).
        tokenizer_texts: rows (prompt + completion, train split first) the tokenizer is trained on.
        mid_rows: also write a ``mid`` dataset of this many SID mid-training rows
            (:func:`~diffgr2_trl.rerank.midtrain.build_midtraining_rows`, from training sequences only); 0: none.
        mid_mix: task weights of the mid-training rows (``"front=0.5,repeat=0.15,..."``; default mix if ``None``).
        id_line: prompts follow the candidates with their ID line (:func:`~diffgr2_trl.rerank.prompts.format_id_line`).
        targets: the completions' rankings (:func:`build_rows`); valid and test rows are built the same way (their
            ``target`` column is always the true next item, which evaluation reads).
        provenance: what produced the directory, recorded in ``summary.json`` as ``inputs`` (``diffgr2 prepare``
            refuses to reuse a directory whose recorded inputs differ from its own).
        evidence_levels: levels of the evidence ranker (``targets="evidence"``), fitted on the train split and saved
            as ``evidence_ranker.pkl`` (the pipeline's reference row reads it).
        store: what the prompts' role line says is sold (default: the dataset's name from ``provenance``).
        evidence_features: the features the evidence ranker scores with (None: all of
            :data:`~diffgr2_trl.rerank.evidence.FEATURES`).

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    import random

    from datasets import Dataset

    from .tokenizer import train_rerank_tokenizer

    out_dir = Path(prepared.out_dir)
    sids = prepared.semantic_ids
    if store is None:
        store = ((provenance or {}).get("data") or {}).get("dataset")
    ranker = None
    if targets == "evidence":
        if progress:
            print(f"prepare: fitting the evidence ranker ({evidence_levels} levels) on "
                  f"{len(prepared.examples['train'])} train rows", flush=True)
        ranker = fit_evidence_ranker(prepared, max_history, evidence_levels, seed, evidence_features)
    rows: dict[str, list[dict]] = {}
    for split in SPLITS:
        examples = prepared.examples[split]
        if split == "train" and match_positions:
            examples = match_target_positions(examples, prepared.examples[match_positions], seed)
        if split == "train" and max_train_examples is not None and len(examples) > max_train_examples:
            examples = random.Random(seed).sample(examples, max_train_examples)
        rows[split] = build_rows(examples, sids, max_history, progress, desc=f"{split} rows", id_line=id_line,
                                 targets=targets, ranker=ranker, cross_fitted=split == "train", store=store)

    mid: list[dict] = []
    if mid_rows > 0:
        from .candidates import load_train_sequences
        from .midtrain import build_midtraining_rows

        mid = build_midtraining_rows(
            load_train_sequences(out_dir), sids, mid_rows, n_candidates=prepared.prerank.get("n_candidates", 10),
            max_history=min(max_history or 10, 10), mix=mid_mix, seed=seed, with_id_line=id_line,
        )

    corpus = [r["prompt"] + r["completion"] for s in SPLITS for r in rows[s]][:tokenizer_texts]
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline.tmp-", dir=out_dir))
    try:
        tokenizer = train_rerank_tokenizer(
            corpus, sids.tokens(), sids.attribute_vocab(), vocab_size=vocab_size, out_dir=tmp / "tokenizer"
        )
        if ranker is not None:
            ranker.save(tmp / EVIDENCE_RANKER)
        for split in SPLITS:
            Dataset.from_list(rows[split]).save_to_disk(str(tmp / "datasets" / split))
            write_jsonl(rows[split], tmp / "datasets" / f"{split}.jsonl")
        if mid:
            Dataset.from_list(mid).save_to_disk(str(tmp / "datasets" / "mid"))
            write_jsonl(mid, tmp / "datasets" / "mid.jsonl")
        lengths = {
            split: {
                "prompt": token_lengths(tokenizer, [r["prompt"] for r in rows[split][:2000]]),
                "completion": token_lengths(tokenizer, [r["completion"] for r in rows[split][:2000]]),
            }
            for split in SPLITS
        }
        summary = {
            "rows": {**{s: len(rows[s]) for s in SPLITS}, **({"mid": len(mid)} if mid else {})},
            "mid_tasks": dict(Counter(r["task"] for r in mid)),
            "stats": prepared.stats,
            "prerank_chosen": prepared.prerank.get("chosen"),
            "floor": {s: prepared.prerank["splits"][s]["floor"] for s in SPLITS},
            "token_lengths": lengths,
            "tokenizer_size": len(tokenizer),
            "max_history": max_history,
            "max_train_examples": max_train_examples,
            "match_positions": match_positions,
            "mid_rows": mid_rows,
            "id_line": id_line,
            "targets": targets,
            "store": store,
            **({"evidence_ranker": {"levels": ranker.n_levels, "thresholds": ranker.thresholds,
                                    "train_copy_rate": completion_copy_rate(rows["train"])}} if ranker is not None else {}),
            **({"inputs": provenance} if provenance is not None else {}),
            "train_floor_after_matching": summarize_ranks(
                r["candidates"].index(r["target"]) for r in rows["train"]
            ),
        }
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        # Replace the previous outputs only now that the new ones are complete.
        for name in ("datasets", "tokenizer", EVIDENCE_RANKER, SUMMARY):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for name in ("datasets", "tokenizer", EVIDENCE_RANKER):
            if (tmp / name).exists():
                (tmp / name).rename(out_dir / name)
        (tmp / SUMMARY).rename(out_dir / SUMMARY)  # last: its presence marks the directory complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def load_split(prepared_dir: str | os.PathLike, split: str):
    """The ``datasets.Dataset`` of one split written by :func:`build_pipeline_data`."""
    from datasets import load_from_disk

    path = Path(prepared_dir) / "datasets" / split
    if not path.is_dir():
        raise FileNotFoundError(f"No {split!r} dataset at {path}; run `diffgr2 prepare --output_dir {prepared_dir}` first.")
    return load_from_disk(str(path))


def load_tokenizer(prepared_dir: str | os.PathLike):
    """The local tokenizer written by :func:`build_pipeline_data`."""
    from transformers import AutoTokenizer

    path = Path(prepared_dir) / "tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"No tokenizer at {path}; run `diffgr2 prepare --output_dir {prepared_dir}` first.")
    return AutoTokenizer.from_pretrained(str(path))


def load_evidence_ranker(prepared_dir: str | os.PathLike) -> EvidenceRanker:
    """The :class:`~.evidence.EvidenceRanker` a ``targets="evidence"`` preparation fitted and saved."""
    path = Path(prepared_dir) / EVIDENCE_RANKER
    if not path.is_file():
        raise FileNotFoundError(f"No evidence ranker at {path}: prepare the data with --targets evidence.")
    return EvidenceRanker.load(path)


def load_summary(prepared_dir: str | os.PathLike) -> dict:
    return json.loads((Path(prepared_dir) / SUMMARY).read_text())


def load_all(prepared_dir: str | os.PathLike) -> PreparedData:
    """Convenience re-export of :func:`~diffgr2_trl.rerank.candidates.load_prepared`."""
    return load_prepared(prepared_dir)


# ------------------------------------------------------------------------------- which data a model was trained on

# Written into every model directory trained on a prepared directory: evaluating or training that model on prepared
# data with other semantic IDs or another tokenizer is refused (its IDs would mean other items, its tokens others).
DATA_RECORD = "diffgr2_data.json"


def data_identity(prepared_dir: str | os.PathLike) -> dict | None:
    """What a model trained on ``prepared_dir`` depends on: the dataset's name, and digests of its semantic IDs and
    tokenizer (other preparation options, such as a subsampled train split, do not change what the IDs mean).
    ``None`` when ``prepared_dir`` is not a ``diffgr2 prepare`` output directory."""
    import hashlib

    d = Path(prepared_dir)
    sids, tok = d / "semantic_ids.json", d / "tokenizer" / "tokenizer.json"
    if not (d / SUMMARY).is_file() or not sids.is_file() or not tok.is_file():
        return None
    summary = load_summary(d)
    dataset = (((summary.get("inputs") or {}).get("data") or {}).get("dataset")) or "unknown"
    digest = hashlib.sha256(sids.read_bytes() + b"\0" + tok.read_bytes()).hexdigest()[:16]
    return {"dataset": dataset, "prepared_dir": str(d.resolve()), "sids_and_tokenizer": digest}


def record_training_data(model_dir: str | os.PathLike, prepared_dir: str | os.PathLike | None) -> None:
    """Write :data:`DATA_RECORD` into ``model_dir`` (nothing when ``prepared_dir`` is not a prepare directory)."""
    from ..utils import atomic_write_text

    identity = data_identity(prepared_dir) if prepared_dir else None
    if identity is not None and Path(model_dir).is_dir():
        atomic_write_text(Path(model_dir) / DATA_RECORD, json.dumps(identity, indent=2))


def check_model_data(model_dir: str | os.PathLike, prepared_dir: str | os.PathLike | None,
                     allow_other_data: bool = False) -> None:
    """Refuse to use the model in ``model_dir`` on ``prepared_dir`` when it was trained on data with other semantic IDs
    or another tokenizer (:data:`DATA_RECORD`); ``allow_other_data=True`` (deliberate transfer) only warns.
    A model without a record (not trained here) or data that is not a prepare directory is not checked."""
    import logging

    from ..errors import UserError

    record_path = Path(model_dir) / DATA_RECORD
    identity = data_identity(prepared_dir) if prepared_dir else None
    if identity is None or not record_path.is_file():
        return
    trained = json.loads(record_path.read_text())
    if trained.get("sids_and_tokenizer") == identity["sids_and_tokenizer"]:
        return
    message = (f"the model in {model_dir} was trained on {trained.get('dataset')} ({trained.get('prepared_dir')}, "
               f"IDs+tokenizer {trained.get('sids_and_tokenizer')}), not on {identity['dataset']} ({prepared_dir}, "
               f"IDs+tokenizer {identity['sids_and_tokenizer']}): its semantic IDs name other items there")
    if not allow_other_data:
        raise UserError(message + "; pass --allow_other_data to use it anyway (a deliberate transfer).")
    logging.getLogger(__name__).warning("--allow_other_data: %s.", message)
