"""Mid-training step cost, side by side in one run: TRL's SFTTrainer vs the copy-learning loop, same lists, same model.

    python scripts/measure_mid_step.py --dataset_name runs/cpu/prepare/data [--shape mini] [--steps 30] [--threads 2]

Both train a fresh copy of the same config-built model on the same seeded mid-training lists (``batch_size`` a step)
and report seconds per step after ``warmup`` steps, lists/s and the ratio. Run it on a quiet machine (one job).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_name", required=True)
    ap.add_argument("--shape", default="mini")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--id_line", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank.ar import tokenize_prompt_completion
    from diffgr2_trl.rerank.candidates import load_train_sequences
    from diffgr2_trl.rerank.copying import CopyRecipe, train_copying
    from diffgr2_trl.rerank.midtrain import build_midtraining_rows
    from diffgr2_trl.rerank.pipeline_data import load_tokenizer
    from diffgr2_trl.rerank.semantic_ids import SemanticIds
    from diffgr2_trl.utils import set_threads

    set_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}")
    tok = load_tokenizer(args.dataset_name)
    sids = SemanticIds.load(Path(args.dataset_name) / "semantic_ids.json")
    seqs = load_train_sequences(args.dataset_name)
    n = args.steps + args.warmup

    # the copy-learning loop: fresh lists, seed + step (the same lists SFTTrainer gets below)
    model = build_model("qwen3", tokenizer=tok, shape=args.shape, max_position_embeddings=1024, seed=0)
    recipe = CopyRecipe(id_line=args.id_line, batch_size=args.batch_size, max_steps=n, warmup_steps=1)
    points = train_copying(model, tok, seqs, sids, recipe, None, eval_steps=1, evaluate_first=False, progress=False)
    loop = [p["s_per_step"] for p in points][args.warmup:]

    # TRL's SFTTrainer on the same rows (tokenised up front, as the prepared source does)
    rows = [r for step in range(n) for r in build_midtraining_rows(seqs, sids, args.batch_size, mix=None, seed=step,
                                                                    with_id_line=args.id_line)]
    ds = tokenize_prompt_completion(Dataset.from_list(rows).select_columns(["prompt", "completion"]), tok)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    model = build_model("qwen3", tokenizer=tok, shape=args.shape, max_position_embeddings=1024, seed=0)
    config = SFTConfig("/tmp/measure-mid-step", max_steps=n, per_device_train_batch_size=args.batch_size,
                       learning_rate=3e-3, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                       logging_steps=10**6, disable_tqdm=True, completion_only_loss=True, max_length=400,
                       dataloader_num_workers=0, seed=0)
    SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[Timer()]).train()
    trl = times[args.warmup:]

    result = {"shape": args.shape, "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
              "sft_trainer_s_per_step": statistics.median(trl), "copy_loop_s_per_step": statistics.median(loop)}
    result["sft_trainer_lists_per_s"] = args.batch_size / result["sft_trainer_s_per_step"]
    result["copy_loop_lists_per_s"] = args.batch_size / result["copy_loop_s_per_step"]
    result["speedup"] = result["sft_trainer_s_per_step"] / result["copy_loop_s_per_step"]
    print(f"SFTTrainer {result['sft_trainer_s_per_step']:.3f} s/step ({result['sft_trainer_lists_per_s']:.0f} lists/s)"
          f" | copy loop {result['copy_loop_s_per_step']:.3f} s/step ({result['copy_loop_lists_per_s']:.0f} lists/s)"
          f" | {result['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
