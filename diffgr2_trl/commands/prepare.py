"""``diffgr2 prepare``: data, pre-ranker candidates, semantic IDs, prompt/completion datasets and the local tokenizer.

Example (the dataset found automatically: ``--data_dir``, ``$DIFFGR2_DATA_DIR`` or the shared data directory; ~1-2 min
on 2 CPU cores for an Amazon dataset of ~20k users)::

    diffgr2 prepare --output_dir runs/prepared

(``--out`` is a deprecated spelling of ``--output_dir``.) Re-running with a complete ``--output_dir`` directory does nothing (pass ``--overwrite`` to rebuild). See
:mod:`diffgr2_trl.rerank.pipeline_data` for what is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._args import parse_command


@dataclass
class PrepareArguments:
    """Arguments of ``diffgr2 prepare``.

    Parameters:
        output_dir: output directory.
        data_dir: directory with ``{name}.txt`` and ``{name}_item2attributes.json`` (default: located automatically,
            see :func:`diffgr2_trl.rerank.data.locate_data_dir`).
        name: dataset file stem (default: inferred from the directory's one ``NAME.txt`` +
            ``NAME_item2attributes.json`` pair).
        train_rows: ``all_prefixes`` builds a training row from every prefix of each user's training items, with
            candidates scored leave-one-out (the user's own transitions from the target on removed), so the target's
            pre-rank position follows the valid/test distribution; ``last`` keeps one row per user.
        mid_rows / mid_mix: SID mid-training rows (:mod:`diffgr2_trl.rerank.midtrain`) and their task weights.
        prerankers: comma-separated pre-rankers to fit (``transition``, ``sasrec``, ``popularity``); the best on
            validation NDCG@10 makes the candidates. ``transition`` alone keeps the step under a couple of minutes
            (SASRec adds ~3 min on 2 CPU cores and is worse at that budget, see results/data_prerank.md).
        max_train_examples: subsample the train split (seeded) to this many rows.
        max_history: history items shown per prompt.
        id_line: follow the candidates with their IDs written as the answer writes them
            (:func:`diffgr2_trl.rerank.prompts.format_id_line`), in the re-ranking and mid-training prompts.
        targets: the training completions' rankings: ``label`` puts the true next item first (an oracle trace: it also
            promotes targets no evidence in the prompt points to), ``supported`` only where the prompt's brand/category
            evidence singles the target out, else keeps the pre-rank order
            (:func:`diffgr2_trl.rerank.traces.supported_ranking`; results/copy_learning.md measures both), or
            ``evidence``: the ranking of a label-free procedure fitted on the train split
            (:mod:`diffgr2_trl.rerank.evidence`), whose trace states each candidate's evidence and level, so the
            ranking follows from the prompt.
        evidence_levels: levels the evidence ranker groups the candidates into (2: promote / keep).
        evidence_features: comma-separated features the evidence ranker scores with (default: all of
            :data:`diffgr2_trl.rerank.evidence.FEATURES`); e.g. ``position,link_idf,ago_linked`` makes each level a
            function of what the trace states.
        match_positions: subsample train so the pre-rank position of the target follows this split's histogram
            (``none`` keeps the raw split; see :func:`diffgr2_trl.rerank.pipeline_data.match_target_positions`).
        codebook_size: semantic-ID codes per level (small catalogues need fewer).
        sid_last_level: how the last semantic-ID level resolves collisions: ``rank`` (the item's rank among the items
            sharing the other levels: ``<d_0>`` for most items, rare ``<d_1>``, ``<d_2>``, ...) or ``random``
            (distinct seeded codes spread over the codebook, so no last-level token is rare; a small model copies
            them far better, see :mod:`diffgr2_trl.rerank.semantic_ids`).
        attribute_order: the order of an item's attribute tokens wherever it is shown: ``file`` (as the dataset lists
            them) or ``rarity`` (rarest first over the catalogue, :func:`diffgr2_trl.rerank.semantic_ids.rarest_first`),
            so a prompt shows how telling each token is.
        rarity_marks: follow every attribute token with ``<rare_K>``, its rarity class among this many
            (:func:`diffgr2_trl.rerank.semantic_ids.rarity_classes`: equal shares of the catalogue's attribute
            occurrences, 0 the rarest), so a prompt shows how rare each token is, not only which is rarer; 0: no marks.
        vocab_size: BPE size of the local tokenizer.
        overwrite: rebuild even if ``output_dir`` is complete.
        threads: torch intra-op CPU threads (0: torch's default), as in every subcommand.
    """

    output_dir: str = field(metadata={"help": "Output directory."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Dataset directory; when not given, $DIFFGR2_DATA_DIR or ../shared/data/amazon-beauty."},
    )
    name: str | None = field(
        default=None, metadata={"help": "Dataset file stem ({name}.txt; default: inferred from data_dir)."}
    )
    train_rows: str = field(
        default="all_prefixes",
        metadata={"help": "all_prefixes (every training prefix, leave-one-out candidates) or last (one per user)."},
    )
    prerankers: str = field(default="transition", metadata={"help": "Comma-separated: transition, sasrec, popularity."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the train split to N rows."})
    max_history: int = field(default=20, metadata={"help": "History items shown per prompt."})
    id_line: bool = field(default=True, metadata={"help": "Add a line with the candidate IDs as the answer writes them."})
    targets: str = field(
        default="label",
        metadata={"help": "Completion rankings: label (true next item first), supported (only where evidence "
                          "singles it out) or evidence (a label-free ranker fitted on train; its trace states each "
                          "candidate's evidence and level).", "choices": ["label", "supported", "evidence"]},
    )
    evidence_levels: int = field(
        default=3, metadata={"help": "Levels the evidence ranker groups candidates into (targets=evidence)."}
    )
    evidence_features: str | None = field(
        default=None,
        metadata={"help": "Comma-separated features the evidence ranker scores with (None: all of them)."},
    )
    match_positions: str = field(
        default="none",
        metadata={"help": "Subsample train so target positions follow this split's histogram ('none': raw train)."},
    )
    mid_rows: int = field(default=0, metadata={"help": "SID mid-training rows to build (datasets/mid; 0: none)."})
    mid_mix: str | None = field(
        default=None, metadata={"help": "Mid-training task weights, e.g. front=0.5,repeat=0.15,drop=0.15,next=0.15."}
    )
    codebook_size: int = field(default=256, metadata={"help": "Semantic-ID tokens per level."})
    sid_last_level: str = field(
        default="rank",
        metadata={"help": "Collision-resolving last SID level: rank (mostly <d_0>) or random (spread codes).",
                  "choices": ["rank", "random"]},
    )
    attribute_order: str = field(
        default="file",
        metadata={"help": "Order of an item's attribute tokens in prompts: file (as listed) or rarity (rarest first).",
                  "choices": ["file", "rarity"]},
    )
    rarity_marks: int = field(
        default=0,
        metadata={"help": "Follow every attribute token in prompts with <rare_K>, its rarity class of this many "
                          "(0: no marks)."},
    )
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size of the local tokenizer."})
    seed: int = field(default=0, metadata={"help": "Seed (pre-rankers, semantic IDs, subsampling)."})
    overwrite: bool = field(default=False, metadata={"help": "Rebuild even if the output is complete."})
    allow_truncated: bool = field(
        default=False,
        metadata={"help": "Accept a sequences file whose last line has no newline (cut short?); drop that line."},
    )
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})


def _print_summary(summary: dict, seconds: float | None) -> None:
    print("rows:", json.dumps(summary["rows"]))
    print("dataset:", json.dumps({k: v for k, v in summary["stats"].items() if not isinstance(v, dict)}))
    print(f"pre-ranker: {summary['prerank_chosen']}")
    if summary.get("match_positions"):
        after = summary["train_floor_after_matching"]
        print(f"  train target positions matched to {summary['match_positions']}: R@1 {after['R@1']:.4f}, n {after['n']}")
    for split, floor in summary["floor"].items():
        print(f"  floor {split:5s}: " + " ".join(f"{k} {v:.4f}" if k != "n" else f"n {v}" for k, v in floor.items()))
    for split, lens in summary["token_lengths"].items():
        print(f"  tokens {split:5s}: prompt {json.dumps(lens['prompt'])} completion {json.dumps(lens['completion'])}")
    print(f"tokenizer size: {summary['tokenizer_size']}" + (f" | {seconds:.1f} s" if seconds is not None else ""))


def _evidence_features(text: str | None) -> tuple[str, ...] | None:
    """``--evidence_features`` as a tuple of known feature names (None: all), checked before any work is done."""
    if text is None:
        return None
    from diffgr2_trl.errors import UserError
    from diffgr2_trl.rerank.evidence import check_features

    try:
        return check_features(f.strip() for f in text.split(",") if f.strip())
    except ValueError as e:
        raise UserError(f"--evidence_features {text!r}: {e}") from None


def _predating(stored: dict | None, inputs: dict) -> dict | None:
    """``stored`` (a directory's recorded inputs) with each option it predates filled in at that option's default:
    a directory prepared before an option existed was prepared the way its default prepares, so it still matches."""
    import dataclasses

    if not stored or "options" not in stored:
        return stored
    defaults = {f.name: f.default for f in dataclasses.fields(PrepareArguments) if f.default is not dataclasses.MISSING}
    options = dict(stored["options"])
    for key in inputs["options"]:
        if key not in options and key in defaults:
            options[key] = defaults[key]
    return {**stored, "options": options}


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[PrepareArguments]:
    return parse_command("prepare", (PrepareArguments,), argv, values)


def run(args: PrepareArguments) -> dict[str, Any]:
    """Build (or reuse, when complete and from the same inputs) ``args.output_dir``; returns its summary."""
    from diffgr2_trl.rerank.candidates import load_prepared, prepare_data
    from diffgr2_trl.rerank.pipeline_data import build_pipeline_data, is_complete, load_summary
    from diffgr2_trl.utils import set_threads

    set_threads(args.threads)
    from diffgr2_trl.errors import UserError
    from diffgr2_trl.fingerprint import data_digest, describe_changes

    scored = _evidence_features(args.evidence_features)
    inputs = {"options": {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite", "threads")},
              "data": data_digest(args.data_dir)}
    if is_complete(args.output_dir) and not args.overwrite:
        summary = load_summary(args.output_dir)
        if _predating(summary.get("inputs"), inputs) != inputs:
            changes = "; ".join(describe_changes(summary.get("inputs"), inputs))
            raise UserError(f"{args.output_dir} was prepared from other inputs ({changes}); pass --overwrite to rebuild it, "
                            "or choose another --output_dir.")
        print(f"{args.output_dir} is complete and up to date; nothing to do (--overwrite rebuilds it).")
        _print_summary(summary, None)
        return summary
    t0 = time.perf_counter()
    prerankers = tuple(p.strip() for p in args.prerankers.split(",") if p.strip())
    try:  # a run cut short after the examples (the slow part) reuses them, if they came from the same inputs
        prepared = load_prepared(args.output_dir) if not args.overwrite else None
        if prepared is not None and _predating(prepared.prerank.get("inputs"), inputs) != inputs:
            prepared = None
    except FileNotFoundError:
        prepared = None
    if prepared is None:  # the examples are the slow part (pre-rankers): reuse them when only the datasets are missing
        prepared = prepare_data(
            args.data_dir, args.output_dir, seed=args.seed, name=args.name, prerankers=prerankers, history_len=args.max_history,
            codebook_size=args.codebook_size, sid_last_level=args.sid_last_level, attribute_order=args.attribute_order, rarity_marks=args.rarity_marks, train_rows=args.train_rows, progress=True, provenance=inputs,
            allow_truncated=args.allow_truncated,
        )
    summary = build_pipeline_data(
        prepared,
        max_history=args.max_history,
        max_train_examples=args.max_train_examples,
        vocab_size=args.vocab_size,
        match_positions=None if args.match_positions.lower() == "none" else args.match_positions,
        seed=args.seed,
        mid_rows=args.mid_rows,
        mid_mix=args.mid_mix,
        id_line=args.id_line,
        targets=args.targets,
        evidence_levels=args.evidence_levels,
        evidence_features=scored,
        provenance=inputs,
    )
    _print_summary(summary, time.perf_counter() - t0)
    return summary


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
