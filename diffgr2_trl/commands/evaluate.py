"""``diffgr2 evaluate``: decode a split and report R@k / N@k, validity, throughput and the pre-rank floor.

Example::

    diffgr2 evaluate --model_name_or_path runs/ar/rl --dataset_name runs/prepared --split test --json runs/ar/eval.json
    diffgr2 evaluate --model_name_or_path runs/bd/cft --dataset_name runs/prepared --decoder block --tau 0.9 --limit 500
    diffgr2 evaluate --model_name_or_path runs/bd/cft --dataset_name runs/prepared --decoder block --constrained
    diffgr2 evaluate --model_name_or_path runs/bd/cft --dataset_name runs/prepared --decoder block --workers 2 --threads 2

The decoding options are :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`'s (``--max_completion_length``,
``--tau``, ``--tokens_per_step``, ``--temperature``, ``--top_k``, ...; the ``ar`` decoder is greedy and reads only
``--max_completion_length``). ``--model``, ``--prepared`` and ``--max_new_tokens`` are deprecated spellings of
``--model_name_or_path``, ``--dataset_name`` and ``--max_completion_length``.

Invalid outputs fall back to the pre-rank order for the ranking metrics and are counted in ``valid_rate`` and the
error breakdown (see :mod:`diffgr2_trl.rerank.evaluate`). ``--limit N`` evaluates the first N rows of the split (a
fixed subset: rows are in user order, so the same N always means the same users).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..block_diffusion import BlockDecodingConfig
from ..errors import UserError, check_model_dir
from ._args import parse_command

# evaluate's completion cap when none is given (a ranking with its reasoning needs more than the sampler's 128)
DEFAULTS = {"max_completion_length": 256}


@dataclass
class EvaluateArguments:
    """Arguments of ``diffgr2 evaluate`` besides the decoding options (:class:`BlockDecodingConfig`).

    Parameters:
        model_name_or_path: a saved model directory (its tokenizer saved alongside, as ``train-ar`` does).
        dataset_name: ``diffgr2 prepare`` output directory.
        split: ``train``, ``valid`` or ``test``.
        limit: evaluate only the first N rows (``None``: all).
        decoder: a key of :data:`diffgr2_trl.rerank.evaluate.DECODERS` (``ar``: HF greedy ``generate``;
            ``block``: the block-diffusion sampler).
        batch_size: decoding batch.
        constrained: decode only valid rankings (a permutation of the row's candidates, in the answer template), with
            either decoder (see :mod:`diffgr2_trl.rerank.constraints`); the unconstrained numbers are the paper's.
        threads: torch intra-op CPU threads (0: torch's default); with ``workers``, shared among them.
        workers: decode in this many CPU processes at once, each loading the model and taking whole batches from one
            queue (the batches one process would decode), with ``threads // workers`` threads each (at least 1). On
            2 cores two single-thread workers decoded the cpu run's full test split 1.3-1.55x faster than one two-thread
            process.
            CPU only (a GPU decodes in one process).
        reuse_valid_outputs: the ``outputs`` file of an unconstrained ``ar`` pass of the same model over the same
            rows and ``max_completion_length``, for a ``constrained`` ``ar`` pass: its valid completions are kept
            and only the other rows are decoded. Exact for greedy AR decoding, whose constrained output is its
            unconstrained output whenever that is valid (every token of it is one the constraint allows). Not for
            the block decoder, whose constrained confidences change which tokens commit.
        json: write ``{"n", "metrics", "prerank", ...}`` here (atomically).
        outputs: also write the decoded texts (a JSON list of {user_id, completion, valid, error, rank, prerank_rank,
            ranking, copy}: 0-based ranks of the target after re-ranking and in the pre-rank order, the parsed ranking
            or null when invalid, and whether it is the pre-rank order verbatim) to this path.
    """

    model_name_or_path: str = field(metadata={"help": "Model directory."})
    dataset_name: str = field(metadata={"help": "diffgr2 prepare output directory."})
    split: str = field(default="test", metadata={"help": "Which split to decode.", "choices": ["train", "valid", "test"]})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N rows only."})
    decoder: str = field(
        default="ar",
        metadata={"help": "ar (HF greedy generate), ar_compiled (the same, torch.compile'd) or block (the block sampler)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts per decoding batch."})
    constrained: bool = field(default=False, metadata={"help": "Decode only valid rankings of the candidates."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    workers: int = field(
        default=1,
        metadata={"help": "Decode in this many CPU processes at once (threads shared among them; CPU only)."},
    )
    reuse_valid_outputs: str | None = field(
        default=None,
        metadata={"help": "With --constrained --decoder ar: keep the valid rows of this unconstrained ar --outputs "
                          "file of the same model and rows; decode only the others."},
    )
    json: str | None = field(default=None, metadata={"help": "Write the results JSON here."})
    outputs: str | None = field(default=None, metadata={"help": "Write decoded completions (JSON list) here."})
    allow_other_data: bool = field(
        default=False,
        metadata={"help": "Use a model trained on other prepared data (other semantic IDs/tokenizer) anyway."},
    )

    def __post_init__(self) -> None:
        # Checked here, before any model loads: a bad value should cost a second, not a model load.
        if self.split not in ("train", "valid", "test"):
            raise UserError(f"--split must be train, valid or test, got {self.split!r}.")
        if self.batch_size <= 0:
            raise UserError(f"--batch_size must be positive, got {self.batch_size}.")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive (or unset for the whole split), got {self.limit}.")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}.")
        if self.reuse_valid_outputs is not None and not (self.constrained and self.decoder == "ar"):
            raise UserError(
                "--reuse_valid_outputs needs --constrained and --decoder ar: only greedy AR decoding returns a valid "
                f"unconstrained completion unchanged under the constraint (got decoder {self.decoder!r}, "
                f"constrained {self.constrained})."
            )


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(EvaluateArguments, BlockDecodingConfig)``."""
    return parse_command("evaluate", (EvaluateArguments, BlockDecodingConfig), argv, values, defaults=DEFAULTS)


def run(args: EvaluateArguments, decoding: BlockDecodingConfig) -> dict[str, Any]:
    """Evaluate ``args.model_name_or_path`` on a split; writes ``args.json`` / ``args.outputs`` and returns the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..rerank.evaluate import DECODERS, evaluate_model, stop_token_ids
    from ..rerank.parsing import parse_ranking
    from ..rerank.pipeline_data import check_model_data, load_split
    from ..utils import set_threads, write_json_atomic

    if args.decoder not in DECODERS:
        raise UserError(f"unknown decoder {args.decoder!r}; choose from {sorted(DECODERS)}.")
    check_model_dir(args.model_name_or_path)
    check_model_data(args.model_name_or_path, args.dataset_name, args.allow_other_data)
    set_threads(args.threads)
    ds = load_split(args.dataset_name, args.split)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    rows = ds.select_columns(["prompt", "candidates", "target", "user_id"]).to_list()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers > 1 and device != "cpu":
        raise UserError(f"--workers {args.workers} decodes in several CPU processes; with a {device} device decode in "
                        "one process (--workers 1).")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path,
                                                 dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.to(device).eval()
    decode_fn = DECODERS[args.decoder](config=decoding)
    given = {}
    if args.reuse_valid_outputs:
        given = _reused(args.reuse_valid_outputs, rows, tokenizer, decoding.max_completion_length,
                        stop_token_ids(model, tokenizer))
        print(f"reusing {len(given)} valid unconstrained completions of {len(rows)} rows "
              f"({args.reuse_valid_outputs}); decoding the other {len(rows) - len(given)}")
    kwargs = dict(batch_size=args.batch_size, max_new_tokens=decoding.max_completion_length, keep_outputs=True,
                  constrained=args.constrained, given=given)
    threads = torch.get_num_threads()
    if args.workers > 1:
        from ..rerank.workers import DecodePool

        # this process decodes too, beside workers - 1 children, each with its share of the threads
        torch.set_num_threads(max(1, threads // args.workers))
        try:
            with DecodePool(args.model_name_or_path, args.decoder, decoding, args.workers - 1,
                            torch.get_num_threads()) as pool:
                result = evaluate_model(model, tokenizer, rows, decode_fn, pool=pool, **kwargs)
        finally:
            torch.set_num_threads(threads)
    else:
        result = evaluate_model(model, tokenizer, rows, decode_fn, **kwargs)
    outputs, ranks = result.pop("outputs"), result.pop("ranks")
    result.update(
        split=args.split,
        limit=args.limit,
        model=args.model_name_or_path,
        decoder=args.decoder,
        constrained=args.constrained,
        tau=decoding.tau if args.decoder == "block" else None,
        block_size=decoding.block_size if args.decoder == "block" else None,  # None: the model's trained block
        device=device,
        torch_threads=threads,
        workers=args.workers,
        reused_valid_rows=len(given),
        invalid_outputs="fall back to the pre-rank order for R@k/N@k; counted in valid_rate and errors",
    )
    m, p = result["metrics"], result["prerank"]
    keys = ("R@1", "R@3", "R@5", "N@3", "N@5")
    print(f"{args.split} n={result['n']} decoder={args.decoder}" + (" (constrained)" if args.constrained else ""))
    print("  model  : " + " ".join(f"{k} {m[k]:.4f}" for k in keys) + f" | valid {m['valid_rate']:.4f}")
    print("  prerank: " + " ".join(f"{k} {p[k]:.4f}" for k in keys))
    print("  errors : " + json.dumps(m["errors"]))
    print(
        f"  tokens : {m.get('generated_tokens')} generated, {m.get('mean_completion_tokens', 0):.1f}/example, "
        f"{m.get('tokens_per_s', 0):.1f} tok/s, {m.get('tokens_per_forward', 0):.2f} tok/forward, {m['decode_seconds']} s"
    )
    if args.json:
        write_json_atomic(result, args.json)
    if args.outputs:
        records = []
        for row, text, rank in zip(rows, outputs, ranks):
            parsed = parse_ranking(text, row["candidates"])
            records.append(
                dict(user_id=row["user_id"], completion=text, valid=parsed.valid, error=parsed.error, rank=rank,
                     prerank_rank=row["candidates"].index(row["target"]),
                     ranking=parsed.ranking if parsed.valid else None,
                     copy=parsed.valid and parsed.ranking == list(row["candidates"]))
            )
        write_json_atomic(records, args.outputs)
    return result


def _reused(path: str, rows: list[dict[str, Any]], tokenizer, max_length: int, stop: set[int]) -> dict[int, str]:
    """Row index -> completion, for the rows whose completion in ``path`` (an ``--outputs`` file of the same rows)
    the ranking constraint admits token by token up to its closing stop token: greedy AR decoding under the
    constraint returns exactly that completion. Other rows (invalid, or valid in a form the constraint does not
    write, e.g. closed by another stop token) are left to decode. A file of other rows is refused."""
    from pathlib import Path

    from ..rerank.constraints import RankingConstraint
    from ..rerank.parsing import parse_ranking

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--reuse_valid_outputs {path}: no such file (an --outputs file of diffgr2 evaluate).")
    try:
        records = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--reuse_valid_outputs {path}: not JSON ({e}).") from e
    if not isinstance(records, list) or len(records) != len(rows):
        n = len(records) if isinstance(records, list) else type(records).__name__
        raise UserError(f"--reuse_valid_outputs {path}: {n} records for the {len(rows)} rows evaluated; it must come "
                        "from a pass over the same split and --limit.")
    given = {}
    for i, (record, row) in enumerate(zip(records, rows)):
        if not isinstance(record, dict) or not {"user_id", "completion", "valid"} <= record.keys():
            raise UserError(f"--reuse_valid_outputs {path}: record {i} lacks user_id, completion or valid.")
        if record["user_id"] != row["user_id"]:
            raise UserError(f"--reuse_valid_outputs {path}: record {i} is user {record['user_id']!r}, the row is user "
                            f"{row['user_id']!r}; it must come from a pass over the same split and --limit.")
        if record["valid"]:
            if not parse_ranking(record["completion"], row["candidates"]).valid:
                raise UserError(f"--reuse_valid_outputs {path}: record {i} is marked valid but its completion is not "
                                "a valid ranking of the row's candidates.")
            constraint = RankingConstraint.for_rows(tokenizer, [row["candidates"]], max_length, stop)[0]
            ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            if ids and ids[-1] == constraint.eos and len(ids) <= max_length and constraint.consistent(ids):
                given[i] = record["completion"]
    return given


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


if __name__ == "__main__":  # the pipeline's side-by-side constrained pass runs it as a module
    import sys

    sys.exit(main(sys.argv[1:]))
