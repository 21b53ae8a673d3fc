"""The rewards run unchanged from TRL's own CLI: ``trl grpo --reward_funcs rewards.rerank.gr2_reward ...``.

Builds a tiny Qwen3 and a locally trained tokenizer, a ``train.jsonl`` dataset with ``prompt``/``candidates``/``target``,
and runs one real GRPO step on CPU in a subprocess (the example script's helpers, so the example stays correct).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_rewards", REPO_ROOT / "examples" / "trl_grpo_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("trl") is None, reason="the `trl` console script is not installed")
def test_trl_grpo_cli_one_step(tmp_path):
    example = _example()
    rows = example.write_toy_dataset(tmp_path / "data", n_rows=4)
    assert set(rows[0]) == {"prompt", "candidates", "target"} and len(rows[0]["candidates"]) == 10
    example.write_tiny_model(tmp_path / "model", [r["prompt"] for r in rows])

    cmd = example.grpo_command(tmp_path / "model", tmp_path / "data", tmp_path / "out", max_completion_length=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    logged = dict(re.findall(r"'(rewards/[a-z_0-9]+/mean)': '([-0-9.e]+)'", log))
    # A random model writes 6 tokens, never a valid ranking: exactly the invalid penalty, and a number rather than
    # NaN proves the `candidates`/`target` columns reached the reward functions (missing columns would give None).
    assert logged == {"rewards/gr2_reward/mean": "-1", "rewards/validity/mean": "0", "rewards/ndcg_at_3/mean": "0"}
