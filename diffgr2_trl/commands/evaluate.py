"""``diffgr2 evaluate``: decode a split greedily and report R@k / N@k, validity, throughput and the pre-rank floor.

Example::

    diffgr2 evaluate --model runs/ar/rl --prepared runs/prepared --split test --json runs/ar/eval_test.json
    diffgr2 evaluate --model runs/bd/cft --prepared runs/prepared --decoder block --tau 0.9 --limit 500

Invalid outputs fall back to the pre-rank order for the ranking metrics and are counted in ``valid_rate`` and the
error breakdown (see :mod:`diffgr2_trl.rerank.evaluate`). ``--limit N`` evaluates the first N rows of the split (a
fixed subset: rows are in user order, so the same N always means the same users).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import TrlParser

from ..errors import UserError, check_model_dir


@dataclass
class EvaluateArguments:
    """Arguments of ``diffgr2 evaluate``.

    Parameters:
        model: a saved model directory (its tokenizer saved alongside, as ``train-ar`` does).
        prepared: ``diffgr2 prepare`` output directory.
        split: ``train``, ``valid`` or ``test``.
        limit: evaluate only the first N rows (``None``: all).
        decoder: a key of :data:`diffgr2_trl.rerank.evaluate.DECODERS` (``ar``: HF greedy ``generate``;
            ``block``: the block-diffusion sampler).
        tau: confidence threshold of the block decoder.
        batch_size / max_new_tokens: decoding batch and completion cap.
        threads: torch CPU threads (0: default).
        json: write ``{"n", "metrics", "prerank", ...}`` here (atomically).
        outputs: also write the decoded texts (a JSON list of {user_id, completion, valid, error, rank, prerank_rank},
            0-based ranks of the target after re-ranking and in the pre-rank order) to this path.
    """

    model: str = field(metadata={"help": "Model directory."})
    prepared: str = field(metadata={"help": "diffgr2 prepare output directory."})
    split: str = field(default="test", metadata={"help": "train, valid or test."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N rows only."})
    decoder: str = field(default="ar", metadata={"help": "ar or block."})
    tau: float = field(default=0.9, metadata={"help": "Block decoder confidence threshold."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per decoding batch."})
    max_new_tokens: int = field(default=256, metadata={"help": "Completion cap (tokens)."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: default)."})
    json: str | None = field(default=None, metadata={"help": "Write the results JSON here."})
    outputs: str | None = field(default=None, metadata={"help": "Write decoded completions (JSON list) here."})

    def __post_init__(self) -> None:
        # Checked here, before any model loads: a bad value should cost a second, not a model load.
        if not 0 < self.tau <= 1:
            raise UserError(f"--tau must be in (0, 1], got {self.tau}.")
        if self.split not in ("train", "valid", "test"):
            raise UserError(f"--split must be train, valid or test, got {self.split!r}.")
        if self.batch_size <= 0 or self.max_new_tokens <= 0:
            raise UserError(f"--batch_size and --max_new_tokens must be positive, got {self.batch_size}, "
                            f"{self.max_new_tokens}.")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive (or unset for the whole split), got {self.limit}.")


def main(argv: list[str] | None = None) -> int:
    (args,) = TrlParser((EvaluateArguments,)).parse_args_and_config(args=argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffgr2_trl.rerank.evaluate import DECODERS, evaluate_model, write_json_atomic
    from diffgr2_trl.rerank.parsing import parse_ranking
    from diffgr2_trl.rerank.pipeline_data import load_split

    if args.decoder not in DECODERS:
        raise UserError(f"unknown decoder {args.decoder!r}; choose from {sorted(DECODERS)}.")
    check_model_dir(args.model)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ds = load_split(args.prepared, args.split)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    rows = ds.select_columns(["prompt", "candidates", "target", "user_id"]).to_list()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.to(device).eval()
    decode_fn = DECODERS[args.decoder](tau=args.tau)
    result = evaluate_model(
        model, tokenizer, rows, decode_fn, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, keep_outputs=True
    )
    outputs, ranks = result.pop("outputs"), result.pop("ranks")
    result.update(
        split=args.split,
        limit=args.limit,
        model=args.model,
        decoder=args.decoder,
        tau=args.tau if args.decoder == "block" else None,
        device=device,
        torch_threads=torch.get_num_threads(),
        invalid_outputs="fall back to the pre-rank order for R@k/N@k; counted in valid_rate and errors",
    )
    m, p = result["metrics"], result["prerank"]
    keys = ("R@1", "R@3", "R@5", "N@3", "N@5")
    print(f"{args.split} n={result['n']} decoder={args.decoder}")
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
                     prerank_rank=row["candidates"].index(row["target"]))
            )
        write_json_atomic(records, args.outputs)
    return 0
