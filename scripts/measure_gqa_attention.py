"""Evaluation decoding with and without :func:`~diffgr2_trl.block_diffusion.attention.cpu_gqa_attention`, side by side.

transformers' ``sdpa`` copies every key/value head once per query head that shares it whenever an attention mask
reaches it on a CPU; decoding always passes one, so every step copies the KV cache once per layer.
``cpu_gqa_attention`` (on in ``evaluate`` and the block sampler) lets torch's kernel broadcast the heads instead.
This script decodes the same rows in the same batches both ways, arms alternating, and checks the texts are equal::

    python scripts/measure_gqa_attention.py --ar_model runs/cpu/ar_rl/model --block_model runs/cpu/cft/model \\
        --dataset_name runs/cpu/prepare/data --limit 96 --batch_size 32 --threads 2 --json results/gqa_attention.json

Time it on a quiet machine (one job, threads pinned); the fastest of ``--repeats`` runs per arm is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ar_model", default=None, help="AR model directory (HF generate, greedy).")
    p.add_argument("--block_model", default=None, help="Converted model directory (block sampler).")
    p.add_argument("--dataset_name", required=True, help="diffgr2 prepare output directory.")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--decode_block_size", type=int, default=8, help="Block sampler sub-block size (0: the model's).")
    p.add_argument("--max_completion_length", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not (args.ar_model or args.block_model):
        p.error("give --ar_model, --block_model or both")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import diffgr2_trl.rerank.evaluate as evaluate_module
    from diffgr2_trl.block_diffusion import BlockDecodingConfig
    from diffgr2_trl.block_diffusion.attention import without_cpu_gqa_attention
    from diffgr2_trl.rerank.pipeline_data import load_split
    from diffgr2_trl.utils import set_threads, write_json_atomic

    set_threads(args.threads)
    ds = load_split(args.dataset_name, args.split)
    rows = ds.select(range(min(args.limit, len(ds)))).select_columns(["prompt", "candidates", "target"]).to_list()
    results = {"rows": len(rows), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg()[0], "runs": []}
    # The decoders enter cpu_gqa_attention(model) themselves: the "on" arm adds nothing, the "off" arm disables it.
    arms = {"transformers_sdpa": without_cpu_gqa_attention, "cpu_gqa_attention": contextlib.nullcontext}
    block_config = BlockDecodingConfig(tau=args.tau, block_size=args.decode_block_size or None)
    for kind, path in (("ar", args.ar_model), ("block", args.block_model)):
        if path is None:
            continue
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        decode = evaluate_module.ar_greedy_decode if kind == "ar" else evaluate_module.make_block_decode(config=block_config)
        seconds: dict[str, list[float]] = {a: [] for a in arms}
        texts: dict[str, list] = {}
        for _ in range(args.repeats):
            for arm, context in arms.items():
                t0 = time.perf_counter()
                with context():
                    out = evaluate_module.evaluate_model(model, tok, rows, decode_fn=decode,
                                                         batch_size=args.batch_size,
                                                         max_new_tokens=args.max_completion_length, progress=False,
                                                         keep_outputs=True)
                seconds[arm].append(time.perf_counter() - t0)
                texts.setdefault(arm, out["outputs"])
        run = {"decoder": kind, "model": path, "seconds": {a: [round(s, 3) for s in v] for a, v in seconds.items()},
               "speedup": min(seconds["transformers_sdpa"]) / min(seconds["cpu_gqa_attention"]),
               "same_outputs": texts["transformers_sdpa"] == texts["cpu_gqa_attention"]}
        results["runs"].append(run)
        print(f"{kind}: {run['speedup']:.2f}x with cpu_gqa_attention, same outputs: {run['same_outputs']} "
              f"({run['seconds']})", flush=True)
    if args.json:
        write_json_atomic(results, args.json)


if __name__ == "__main__":
    main()
