"""``diffgr2 train-ar``: the AR GR2 re-ranker, trained with TRL (``SFTTrainer``, then ``GRPOTrainer`` / DAPO).

Examples::

    # CPU (config-built Qwen3 "small" + the local tokenizer), both stages:
    diffgr2 train-ar --prepared runs/prepared --out runs/ar --stage all --preset cpu
    # GPU, a real checkpoint with LoRA:
    diffgr2 train-ar --prepared runs/prepared --out runs/ar-0.6b --preset gpu --model_name_or_path Qwen/Qwen3-0.6B --use_peft

``--preset NAME`` loads ``diffgr2_trl/presets/ar_NAME.yaml`` as defaults; a ``--config`` file overrides the preset and
command-line options override both. The SFT model is saved to ``OUT/sft``, the RL model to ``OUT/rl``, and
``OUT/train_{stage}.json`` records rows, steps, runtime and the log history.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from trl import TrlParser

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def _with_preset(argv: list[str]) -> tuple[list[str], str | None]:
    """Turn ``--preset NAME`` into a ``--config`` file (merged under a user ``--config``, which wins)."""
    argv = list(argv)
    preset = None
    for flag in ("--preset",):
        if flag in argv:
            i = argv.index(flag)
            preset = argv[i + 1]
            del argv[i : i + 2]
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
            del argv[i]
            break
    if preset is None:
        return argv, None
    path = PRESETS / f"ar_{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("ar_") for p in PRESETS.glob("ar_*.yaml"))
        raise SystemExit(f"diffgr2 train-ar: unknown preset {preset!r}; choose from {known}.")
    merged = yaml.safe_load(path.read_text()) or {}
    if "--config" in argv:
        i = argv.index("--config")
        merged.update(yaml.safe_load(Path(argv[i + 1]).read_text()) or {})
        del argv[i : i + 2]
    merged["preset"] = preset
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(merged, tmp)
    tmp.close()
    return ["--config", tmp.name, *argv], preset


def main(argv: list[str] | None = None) -> int:
    from diffgr2_trl.rerank.ar import ARTrainArguments

    argv, _ = _with_preset(list(sys.argv[1:] if argv is None else argv))
    (args,) = TrlParser((ARTrainArguments,)).parse_args_and_config(args=argv)

    from diffgr2_trl.rerank.ar import load_model_and_tokenizer, run_grpo, run_sft, set_threads

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        stages = (["mid"] if args.mid_max_steps > 0 else []) + ["sft", "rl"]
    else:
        stages = [args.stage]
    if "mid" in stages and args.mid_max_steps <= 0:
        raise SystemExit("diffgr2 train-ar: --stage mid needs --mid_max_steps > 0.")
    for stage in stages:
        t0 = time.perf_counter()
        if stage in ("mid", "sft"):
            start = str(out / "mid") if stage == "sft" and "mid" in stages else None
            model, tokenizer = load_model_and_tokenizer(args, start=start)
            n = sum(p.numel() for p in model.parameters())
            print(f"train-ar {stage}: {type(model).__name__} {n / 1e6:.2f}M params, vocab {len(tokenizer)}")
            info = run_sft(args, model, tokenizer, str(out / stage), stage=stage)
        else:
            start = None if args.model_name_or_path and args.stage == "rl" else str(out / "sft")
            if start is not None and not (Path(start) / "config.json").is_file():
                raise SystemExit(f"diffgr2 train-ar: no SFT model at {start}; run --stage sft first.")
            model, tokenizer = load_model_and_tokenizer(args, start=start)
            info = run_grpo(args, model, tokenizer, str(out / "rl"))
        info["wall_s"] = round(time.perf_counter() - t0, 1)
        info["args"] = vars(args)
        (out / f"train_{stage}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        print(f"train-ar {stage}: {info['rows']} rows, {info['wall_s']} s -> {out / stage}")
    return 0
