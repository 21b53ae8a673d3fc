"""Mid-training step cost with and without the padding mask, side by side in one run (same lists, same init).

    python scripts/measure_padding_mask.py --dataset_name runs/cpu/prepare/data \
        --mix "front=0.3,repeat=0.05,drop=0.1,next=0.05,rerank=0.5" [--steps 20] [--repeats 2] [--threads 2]

The copy-learning loop pads each length class on the right and, since this change, runs such batches without their
padding mask (``rerank/copying.py``: under causal attention no real token sees a later pad). This script trains a
fresh copy of the same config-built model on the same seeded lists twice per repeat, arms alternating (mask, none,
mask, none, ...) so that machine drift hits both, and reports the median seconds per step of each arm, the ratio,
and the largest difference between the two arms' step losses (it should be float noise). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from unittest import mock

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_name", required=True)
    ap.add_argument("--mix", default="front=0.3,repeat=0.05,drop=0.1,next=0.05,rerank=0.5")
    ap.add_argument("--shape", default="mini")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank import copying
    from diffgr2_trl.rerank.candidates import load_train_sequences
    from diffgr2_trl.rerank.pipeline_data import load_tokenizer
    from diffgr2_trl.rerank.semantic_ids import SemanticIds
    from diffgr2_trl.utils import set_threads

    set_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}, threads {torch.get_num_threads()}")
    tok = load_tokenizer(args.dataset_name)
    sids = SemanticIds.load(Path(args.dataset_name) / "semantic_ids.json")
    seqs = load_train_sequences(args.dataset_name)
    n = args.steps + args.warmup
    recipe = copying.CopyRecipe(id_line=True, mix=args.mix, batch_size=args.batch_size, max_steps=n, warmup_steps=1)
    rerank_rows = copying.rerank_rows_for(recipe, args.dataset_name)

    def run(with_mask: bool) -> tuple[list[float], list[float]]:
        model = build_model("qwen3", tokenizer=tok, shape=args.shape, max_position_embeddings=1024, seed=0)
        # the mask arm: the loop as it was, every batch passing its padding mask
        patch = mock.patch.object(copying, "_right_padded", lambda attention: False) if with_mask else mock.MagicMock()
        with patch:
            points = copying.train_copying(model, tok, seqs, sids, recipe, None, eval_steps=1, evaluate_first=False,
                                           progress=False, rerank_rows=rerank_rows)
        return [p["s_per_step"] for p in points][args.warmup:], [p["loss"] for p in points]

    arms: dict[str, list[float]] = {"mask": [], "no_mask": []}
    losses: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for name in ("mask", "no_mask"):
            times, loss = run(name == "mask")
            arms[name] += times
            losses.setdefault(name, loss)
            print(f"repeat {r + 1} {name}: {statistics.median(times):.3f} s/step", flush=True)
    result = {"shape": args.shape, "batch_size": args.batch_size, "mix": args.mix, "steps": args.steps,
              "repeats": args.repeats, "threads": args.threads, "load_average": load,
              "mask_s_per_step": statistics.median(arms["mask"]), "no_mask_s_per_step": statistics.median(arms["no_mask"]),
              "max_loss_difference": max(abs(a - b) for a, b in zip(losses["mask"], losses["no_mask"]))}
    result["speedup"] = result["mask_s_per_step"] / result["no_mask_s_per_step"]
    print(f"with mask {result['mask_s_per_step']:.3f} s/step | without {result['no_mask_s_per_step']:.3f} s/step | "
          f"{result['speedup']:.2f}x | max step-loss difference {result['max_loss_difference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
