"""Decode time of constrained vs unconstrained decoding, same model, same rows, interleaved in one process.

    python scripts/measure_constrained.py --model_name_or_path runs/cpu/rl/model --dataset_name runs/cpu/prepare/data \
        --decoder block --limit 64 --batch_size 32 --repeats 2

Prints one JSON line per run and a summary: seconds, tokens/s and validity of each mode, and the time ratio
(constrained / unconstrained). Runs alternate (free, constrained, free, ...) so load drift hits both alike.

Ratios of two timed runs swing by +-15% on a shared machine. ``constraint_share`` does not: it is the time spent
inside the constraint's hooks (the block sampler's ``row_canvases``, ``constrain_logits`` and ``keep_consistent``, or
the AR ``RankingLogitsProcessor``) as a share of the constrained run's decode time, timed around each call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import diffgr2_trl.block_diffusion.sampler as sampler_module
from diffgr2_trl.block_diffusion import BlockDecodingConfig
from diffgr2_trl.rerank.constraints import RankingLogitsProcessor
from diffgr2_trl.rerank.evaluate import DECODERS, evaluate_model
from diffgr2_trl.rerank.pipeline_data import load_split

SPENT = {"seconds": 0.0}


def _timed(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT["seconds"] += time.perf_counter() - start

    return wrapper


def _time_the_constraint_hooks() -> None:
    for name in ("row_canvases", "constrain_logits", "keep_consistent"):
        setattr(sampler_module, name, _timed(getattr(sampler_module, name)))
    RankingLogitsProcessor.__call__ = _timed(RankingLogitsProcessor.__call__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", required=True, help="a diffgr2 prepare output directory")
    parser.add_argument("--decoder", default="block", choices=sorted(DECODERS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_completion_length", type=int, default=256)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    rows = load_split(args.dataset_name, args.split).select(range(args.limit))
    rows = rows.select_columns(["prompt", "candidates", "target"]).to_list()
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    decode = DECODERS[args.decoder](config=BlockDecodingConfig(max_completion_length=args.max_completion_length,
                                                               tau=args.tau))
    _time_the_constraint_hooks()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for constrained in (False, True):
            SPENT["seconds"] = 0.0
            m = evaluate_model(model, tok, rows, decode, batch_size=args.batch_size,
                               max_new_tokens=args.max_completion_length, progress=False,
                               constrained=constrained)["metrics"]
            record = {"constrained": constrained, "seconds": m["decode_seconds"], "tokens_per_s": m["tokens_per_s"],
                      "valid_rate": m["valid_rate"], "mean_tokens": m["mean_completion_tokens"],
                      "forward_passes": m.get("forward_passes"),
                      "constraint_share": SPENT["seconds"] / m["decode_seconds"]}
            runs[constrained].append(record)
            print(json.dumps(record), flush=True)
    free = statistics.median(r["seconds"] for r in runs[False])
    held = statistics.median(r["seconds"] for r in runs[True])
    free_tps = statistics.median(r["tokens_per_s"] for r in runs[False])
    held_tps = statistics.median(r["tokens_per_s"] for r in runs[True])
    summary = {"decoder": args.decoder, "rows": len(rows), "batch_size": args.batch_size,
               "time_ratio": held / free, "tokens_per_s_ratio": held_tps / free_tps,
               "constraint_share": statistics.median(r["constraint_share"] for r in runs[True])}
    if all(r["forward_passes"] for r in runs[False] + runs[True]):
        # The constraint's own cost per denoising step: constrained rows write the whole answer, so they take more
        # steps than free rows that stop early; time per forward pass separates the two effects.
        per_step = {m: statistics.median(r["seconds"] / r["forward_passes"] for r in runs[m]) for m in runs}
        summary["time_per_forward_ratio"] = per_step[True] / per_step[False]
        summary["forward_passes_ratio"] = (statistics.median(r["forward_passes"] for r in runs[True])
                                           / statistics.median(r["forward_passes"] for r in runs[False]))
    print(json.dumps({**summary,
                      "valid_free": runs[False][0]["valid_rate"], "valid_constrained": runs[True][0]["valid_rate"]}))


if __name__ == "__main__":
    main()
