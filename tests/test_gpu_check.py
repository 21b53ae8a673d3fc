"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's steps run at toy size on CPU and leave their JSON."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import REPO, launch_env


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=REPO,
                         env={**launch_env(), "OUT": str(out)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["bench_decode", "bench_train_sdpa", "bench_memory"]
    assert all(s["exit_status"] == 0 and s["cpu_dry_run"] for s in steps)
    rows = json.loads((out / "bench_decode.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"ar", "block_diffusion"} and {r["batch_size"] for r in rows} == {1, 2}
    assert json.loads((out / "bench_train_sdpa.json").read_text())["cft_over_sft"] > 0
    memory = json.loads((out / "bench_memory.json").read_text())["cases"]
    assert [(c["trainer"], c["completion_length"]) for c in memory] == [("opd", 8), ("grpo", 8)]
    assert all(c["peak_mb"] >= c["setup_mb"] > 0 and c["measure"] == "peak RSS (ru_maxrss)" for c in memory)
    assert not (out / "pipeline").exists()
    from diffgr2_trl.pipeline import load_preset

    trimmed = load_preset("gpu-small", str(out / "pipeline_overrides.yaml"))  # the GPU run's configuration is valid
    assert trimmed["cft"]["max_steps"] == 60 and trimmed["evaluate"]["limit"] == 200


def test_gpu_check_refuses_a_machine_without_a_gpu_and_unknown_flags(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and "no CUDA GPU here; use --cpu-dry-run" in res.stderr
