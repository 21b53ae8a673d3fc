"""The rewards run unchanged from TRL's own CLI: ``trl grpo --reward_funcs diffgr2_trl.rewards.rerank.gr2_reward``.

Runs the example exactly as its docstring documents it (``python examples/trl_grpo_rewards.py --workdir DIR``): it
builds a tiny Qwen3 and a locally trained tokenizer, a ``train.jsonl`` dataset with ``prompt``/``candidates``/``target``,
and runs one real GRPO step of the stock ``trl grpo`` CLI on CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, launch_env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("trl") is None, reason="the `trl` console script is not installed")
def test_trl_grpo_cli_one_step(tmp_path):
    cmd = [sys.executable, "examples/trl_grpo_rewards.py", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "candidates", "target"} and len(rows[0]["candidates"]) == 10
    assert proc.stdout.startswith("trl grpo --model_name_or_path")  # the example prints the command it runs
    assert "TRL currently supports vLLM versions" not in log  # the example keeps TRL's vLLM-version notice out
    logged = dict(re.findall(r"'(rewards/[a-z_0-9]+/mean)': '([-0-9.e]+)'", log))
    # A random model writes 8 tokens, never a valid ranking: exactly the invalid penalty, and a number rather than
    # NaN proves the `candidates`/`target` columns reached the reward functions (missing columns would give None).
    assert logged == {"rewards/gr2_reward/mean": "-1", "rewards/validity/mean": "0", "rewards/ndcg_at_3/mean": "0"}


def test_grpo_command_resolves_reward_names_as_trl_grpo_does():
    """``diffgr2 grpo --reward_funcs`` takes TRL's built-in names (the overlong punishment built from the run's
    max_completion_length, not returned as the factory it is) and dotted paths; anything else is a clear error."""
    from trl import rewards as trl_rewards

    from diffgr2_trl.commands.grpo import resolve_function

    assert resolve_function("think_format_reward") is trl_rewards.think_format_reward
    punish = resolve_function("get_soft_overlong_punishment", max_completion_length=64)
    assert punish(completion_ids=[[1] * 10, [1] * 64]) == [0.0, -1.0]  # a reward function, not the factory
    assert resolve_function("diffgr2_trl.rewards.rerank.gr2_reward").__name__ == "gr2_reward"
    with pytest.raises(ValueError, match="TRL's built-in names"):
        resolve_function("get_reward_model")
