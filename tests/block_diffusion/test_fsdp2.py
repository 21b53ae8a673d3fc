"""FSDP2: the replay, the CFT loss and the sampler on a model sharded with ``fully_shard``, two CPU processes (gloo),
equal the unsharded model's values, gradients and rollouts, and rollouts that need different numbers of forwards per
rank end without a hang (``tests/block_diffusion/fsdp2_replay.py`` does the work; a hang dumps stacks and exits).

accelerate cannot run its FSDP plugin on CPU (``--use_cpu`` turns an FSDP config into DDP, and without it the two
processes train alone), so the trainers' FSDP path cannot be launched here; this test shards with torch directly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, launch_env


@pytest.mark.slow
def test_fsdp2_sharded_replay_and_loss_equal_the_unsharded_model(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/block_diffusion/fsdp2_replay.py", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1]
    for r in records:
        assert r["world_size"] == 2 and r["backend"] == "gloo" and r["sharded"], r
        assert r["steps"] >= 2  # several denoising steps per block: the replay reads several states
        assert r["replay_grad_norm"] > 1e-3
        for key in ("replay_max_diff", "replay_grad_max_diff", "cft_loss_diff", "cft_grad_max_diff"):
            assert r[key] < 1e-5, (key, r)
        # Alone, the ranks would run different numbers of forwards (a hang with sharded weights); synced, the same.
        assert len(set(r["unsynced_forwards"])) == 2, r
        assert len(set(r["synced_forwards"])) == 1 and r["synced_forwards"][0] >= max(r["unsynced_forwards"]), r
        assert r["rollout_equal"], r
