"""GRPO with the re-ranking rewards through TRL's own CLI, unchanged:
``trl grpo --reward_funcs diffgr2_trl.rewards.rerank.X``.

The rewards read two dataset columns besides ``prompt``: ``candidates`` (SID strings in pre-rank order) and
``target`` (the true next item's SID); TRL passes both to every reward function. ``trl grpo`` loads a local dataset
with ``datasets.load_dataset(<dir>)``, so the dataset is a folder of data files (``train.jsonl`` here), not a
``save_to_disk`` folder. The rewards live in the installed package (``diffgr2_trl.rewards``), so the
command works from any directory, beside a project's own ``rewards.py`` too.

Run a toy end-to-end check on CPU (a tiny random Qwen3 and a locally trained tokenizer; ~30 s)::

    python examples/trl_grpo_rewards.py --workdir /tmp/grpo-toy

Against real data, write ``prompt``/``candidates``/``target`` rows with
:func:`diffgr2_trl.rerank.prompts.build_rerank_row` and point ``--model_name_or_path`` at a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REWARDS = [f"diffgr2_trl.rewards.rerank.{name}" for name in ("gr2_reward", "validity", "ndcg_at_3")]


def write_toy_dataset(data_dir: str | Path, n_rows: int = 8, seed: int = 0) -> list[dict]:
    """Random users over a small catalogue, as ``train.jsonl`` rows with ``prompt``, ``candidates``, ``target``."""
    from diffgr2_trl.rerank.prompts import build_rerank_row

    rng = random.Random(seed)
    # Three coarse levels at random; the last level is the item index, which makes every ID unique.
    sid = {i: "".join(f"<{lvl}_{rng.randrange(8)}>" for lvl in "abc") + f"<d_{i}>" for i in range(40)}
    attrs = {i: [f"<attr_{rng.randrange(6)}>", f"<attr_{6 + rng.randrange(6)}>"] for i in range(40)}
    rows = []
    for user in range(n_rows):
        items = rng.sample(range(40), 15)
        example = {
            "user_id": user,
            "history": items[:5],
            "candidates": items[5:],
            "target": items[5 + rng.randrange(10)],
        }
        rows.append(build_rerank_row(example, sid, attrs))
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def write_tiny_model(model_dir: str | Path, texts: list[str]) -> None:
    """A tiny random Qwen3 with a BPE tokenizer trained on ``texts``, saved as an HF checkpoint folder."""
    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank.tokenizer import attr_tokens, sid_level_tokens, train_rerank_tokenizer

    tokenizer = train_rerank_tokenizer(texts, sid_level_tokens(40), attr_tokens(12), vocab_size=400)
    model = build_model("qwen3", tokenizer=tokenizer, shape="tiny", seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def grpo_command(
    model_dir: str | Path, data_dir: str | Path, output_dir: str | Path, max_completion_length: int = 8
) -> list[str]:
    """The ``trl grpo`` command line: one CPU step, float32, nothing saved or reported."""
    return [
        "trl", "grpo",
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data_dir),
        "--reward_funcs", *REWARDS,
        "--output_dir", str(output_dir),
        "--max_steps", "1",
        "--per_device_train_batch_size", "2",
        "--num_generations", "2",
        "--max_completion_length", str(max_completion_length),
        "--learning_rate", "1e-4",
        "--use_cpu", "--bf16", "False", "--dtype", "float32",
        "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        "--seed", "0",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="grpo-toy")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    rows = write_toy_dataset(work / "data")
    write_tiny_model(work / "model", [r["prompt"] for r in rows])
    cmd = grpo_command(work / "model", work / "data", work / "out")
    print(" ".join(cmd), flush=True)
    # TRL warns at import (several times) that the installed vLLM is outside the range it tests; this run never
    # touches vLLM (use_vllm is off), so that notice is noise here. Every other warning still shows.
    quiet = "ignore:TRL currently supports vLLM versions:UserWarning"
    env = dict(os.environ, PYTHONWARNINGS=",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet])))
    return subprocess.call(cmd, cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
