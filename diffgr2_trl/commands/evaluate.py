"""``diffgr2 evaluate``: decode a split and report R@k / N@k, validity, throughput and the pre-rank floor.

Example::

    diffgr2 evaluate --model_name_or_path runs/ar/rl --dataset_name runs/prepared --split test --json runs/ar/eval.json
    diffgr2 evaluate --model_name_or_path runs/bd/cft --dataset_name runs/prepared --decoder block --tau 0.9 --limit 500
    diffgr2 evaluate --model_name_or_path runs/bd/cft --dataset_name runs/prepared --decoder block --constrained

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
        threads: torch intra-op CPU threads (0: torch's default).
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


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(EvaluateArguments, BlockDecodingConfig)``."""
    return parse_command("evaluate", (EvaluateArguments, BlockDecodingConfig), argv, values, defaults=DEFAULTS)


def run(args: EvaluateArguments, decoding: BlockDecodingConfig) -> dict[str, Any]:
    """Evaluate ``args.model_name_or_path`` on a split; writes ``args.json`` / ``args.outputs`` and returns the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..rerank.evaluate import DECODERS, evaluate_model
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
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path,
                                                 dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.to(device).eval()
    decode_fn = DECODERS[args.decoder](config=decoding)
    result = evaluate_model(model, tokenizer, rows, decode_fn, batch_size=args.batch_size,
                            max_new_tokens=decoding.max_completion_length, keep_outputs=True,
                            constrained=args.constrained)
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
        torch_threads=torch.get_num_threads(),
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


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


if __name__ == "__main__":  # the pipeline's side-by-side constrained pass runs it as a module
    import sys

    sys.exit(main(sys.argv[1:]))
