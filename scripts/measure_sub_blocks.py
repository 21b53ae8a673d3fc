"""Full-canvas steps vs sub-block decoding of one block-diffusion re-ranker, on the same test rows, side by side.

A model trained with block size B (32) can be decoded in sub-blocks of S < B (``--decode_block_sizes``): each step's
forward then covers only the active sub-block (committed sub-blocks join the exact KV cache, future ones are not
in the forward at all), instead of the whole B-position canvas. On a CPU a forward costs about what its query
tokens cost, so at batch 32 the full canvas makes block decoding slower than AR; this script measures what sub-blocks
buy in tokens/s and what they cost in validity and accuracy, on real rows with a trained student::

    python scripts/measure_sub_blocks.py --model runs/cpu/cft/model --dataset_name runs/cpu/prepared \\
        --teacher runs/cpu/ar_rl/model --limit 200 --threads 2 --json results/sub_blocks.json

Every configuration decodes the same rows in the same batches; the AR teacher row (``--teacher``) is the
reference for speed. Time it on a quiet machine (one job, threads pinned).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Converted (block-diffusion) model directory.")
    p.add_argument("--dataset_name", required=True, help="diffgr2 prepare output directory.")
    p.add_argument("--teacher", default=None, help="AR model directory: adds an AR greedy row (speed reference).")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--decode_block_sizes", type=int, nargs="+", default=[0, 8, 4],
                   help="Decode block sizes; 0 = the model's own (the full canvas).")
    p.add_argument("--max_completion_length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffgr2_trl.block_diffusion import BlockDecodingConfig, get_spec
    from diffgr2_trl.rerank.evaluate import ar_greedy_decode, evaluate_model, make_block_decode
    from diffgr2_trl.rerank.pipeline_data import load_split
    from diffgr2_trl.utils import set_threads, write_json_atomic

    set_threads(args.threads)
    ds = load_split(args.dataset_name, args.split)
    rows = ds.select(range(min(args.limit, len(ds)))).select_columns(["prompt", "candidates", "target"]).to_list()
    results = {"rows": len(rows), "batch_size": args.batch_size, "tau": args.tau, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg()[0], "runs": []}

    def record(name: str, result: dict) -> None:
        m = result["metrics"]
        row = {"decoder": name, **{k: m.get(k) for k in ("R@1", "R@3", "valid_rate", "tokens_per_s",
                                                         "tokens_per_forward", "mean_completion_tokens",
                                                         "decode_seconds")}}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            write_json_atomic(results, args.json)

    if args.teacher:
        tok = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
        record("ar", evaluate_model(teacher, tok, rows, ar_greedy_decode, batch_size=args.batch_size,
                                    max_new_tokens=args.max_completion_length, progress=False))
        del teacher
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    trained = get_spec(model).block_size
    for size in args.decode_block_sizes:
        config = BlockDecodingConfig(tau=args.tau, block_size=size or None)
        name = f"block {trained}, full canvas" if not size or size == trained else f"block {trained}, sub-blocks of {size}"
        record(name, evaluate_model(model, tok, rows, make_block_decode(config=config), batch_size=args.batch_size,
                                    max_new_tokens=args.max_completion_length, progress=False))
    ar_speed = next((r["tokens_per_s"] for r in results["runs"] if r["decoder"] == "ar"), None)
    if ar_speed:
        for r in results["runs"]:
            r["speedup_vs_ar"] = round(r["tokens_per_s"] / ar_speed, 3)
        if args.json:
            write_json_atomic(results, args.json)
    print(json.dumps(results["runs"], indent=1))


if __name__ == "__main__":
    main()
