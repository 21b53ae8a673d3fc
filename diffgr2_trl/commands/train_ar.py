"""``diffgr2 train-ar``: the AR GR2 re-ranker, trained with TRL (``SFTTrainer``, then ``GRPOTrainer`` / DAPO).

Examples::

    # CPU (config-built Qwen3 "small" + the local tokenizer), both stages:
    diffgr2 train-ar --dataset_name runs/prepared --output_dir runs/ar --stage all --preset cpu
    # GPU, a real checkpoint with LoRA:
    diffgr2 train-ar --dataset_name runs/prepared --output_dir runs/ar-0.6b --preset gpu \
        --model_name_or_path Qwen/Qwen3-0.6B --use_peft

``--preset NAME`` loads ``diffgr2_trl/presets/ar_NAME.yaml`` as defaults; a ``--config`` file overrides the preset and
command-line options override both. The SFT model is saved to ``OUTPUT_DIR/sft``, the RL model to ``OUTPUT_DIR/rl``,
and ``OUTPUT_DIR/train_{stage}.json`` records rows, steps, runtime and the log history. ``--prepared`` and ``--out``
are deprecated spellings of ``--dataset_name`` and ``--output_dir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._args import parse_command


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(ARTrainArguments,)``, the ``--preset`` (``presets/ar_NAME.yaml``) applied under ``--config`` and options."""
    from diffgr2_trl.rerank.ar import ARTrainArguments

    return parse_command("train-ar", (ARTrainArguments,), argv, values, preset_kind="ar")


def run(args) -> dict[str, dict]:
    """Train the stages ``args.stage`` names into ``args.output_dir``; returns ``{stage: its train_{stage}.json}``."""
    from diffgr2_trl.rerank.ar import ar_model_and_tokenizer, run_grpo, run_mid, run_sft
    from diffgr2_trl.utils import set_threads

    set_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        stages = (["mid"] if args.mid_max_steps > 0 else []) + ["sft", "rl"]
    else:
        stages = [args.stage]
    if "mid" in stages and args.mid_max_steps <= 0:
        raise SystemExit("diffgr2 train-ar: --stage mid needs --mid_max_steps > 0.")
    from diffgr2_trl.rerank.pipeline_data import check_model_data, record_training_data

    if args.model_name_or_path:
        check_model_data(args.model_name_or_path, args.dataset_name, args.allow_other_data)
    infos = {}
    for stage in stages:
        t0 = time.perf_counter()
        if stage in ("mid", "sft"):
            start = str(out / "mid") if stage == "sft" and "mid" in stages else None
            model, tokenizer = ar_model_and_tokenizer(args, start=start)
            n = sum(p.numel() for p in model.parameters())
            print(f"train-ar {stage}: {type(model).__name__} {n / 1e6:.2f}M params, vocab {len(tokenizer)}")
            run_stage = run_mid if stage == "mid" else run_sft
            info = run_stage(args, model, tokenizer, str(out / stage))
        else:
            start = None if args.model_name_or_path and args.stage == "rl" else str(out / "sft")
            if start is not None and not (Path(start) / "config.json").is_file():
                raise SystemExit(f"diffgr2 train-ar: no SFT model at {start}; run --stage sft first.")
            model, tokenizer = ar_model_and_tokenizer(args, start=start)
            info = run_grpo(args, model, tokenizer, str(out / "rl"))
        record_training_data(out / stage, args.dataset_name)
        info["wall_s"] = round(time.perf_counter() - t0, 1)
        info["args"] = vars(args)
        (out / f"train_{stage}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        print(f"train-ar {stage}: {info['rows']} rows, {info['wall_s']} s -> {out / stage}")
        infos[stage] = info
    return infos


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
