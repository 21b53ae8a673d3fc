"""Launches that would silently train something else are refused (``diffgr2_trl/trainers/_launch.py``), and a GPU
that is not CUDA is not mistaken for no GPU."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from diffgr2_trl.trainers._launch import check_launch
from tests.helpers import LAUNCH, REPO, launch_env


def _acc(kind, n, device="cpu"):
    return SimpleNamespace(distributed_type=kind, num_processes=n, device=torch.device(device))


def test_a_launched_group_that_trains_alone_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"one of 2 .*trains it alone.*--use_cpu"):
        check_launch(_acc(DistributedType.NO, 1))
    check_launch(_acc(DistributedType.MULTI_CPU, 2))  # a real group passes
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_acc(DistributedType.NO, 1))  # a plain single process passes


@pytest.mark.parametrize(("variable", "wanted"), [("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                                                  ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)])
def test_a_sharding_config_that_accelerate_runs_as_ddp_is_refused(monkeypatch, variable, wanted):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, "true")
    with pytest.raises(RuntimeError, match=rf"asks for {wanted.value}.*runs .*MULTI_CPU.*needs a GPU machine"):
        check_launch(_acc(DistributedType.MULTI_CPU, 2))
    check_launch(_acc(wanted, 2))


def test_fsdp_on_one_gpu_is_refused_as_what_it_is(monkeypatch):
    """accelerate turns FSDP on only for a multi-process group: one process on one GPU runs unsharded (state type
    NO). The error must say that, not blame a CPU fallback."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"one process on one cuda device.*without FSDP.*--num_processes 2"):
        check_launch(_acc(DistributedType.NO, 1, "cuda"))
    with pytest.raises(RuntimeError, match=r"falls back to DDP"):  # one CPU process: the CPU advice, as before
        check_launch(_acc(DistributedType.NO, 1, "cpu"))


def test_mps_or_xpu_machines_do_not_default_to_cpu(monkeypatch):
    from diffgr2_trl.commands._args import _cpu_defaults
    from diffgr2_trl.utils import accelerator_type

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert accelerator_type() == "mps"
    values: dict = {}
    _cpu_defaults(values, [])
    assert values == {}  # the trainer picks the MPS device, as transformers does
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert accelerator_type() is None
    _cpu_defaults(values, [])
    assert values == {"use_cpu": True, "bf16": False}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFGR2_ALL_LAUNCH"), reason="a real two-process FSDP launch: set "
                    "DIFFGR2_ALL_LAUNCH=1 (the refusal itself is tested in-process above)")
def test_fsdp_config_on_cpu_fails_fast_with_advice(tmp_path):
    """accelerate turns the FSDP2 example config into DDP on CPU; the trainer stops before training."""
    cmd = [*LAUNCH[:2], "--config_file", "examples/accelerate/fsdp2.yaml", "--main_process_port", "0",
           "tests/trainers/ddp_train.py", "--output_dir", str(tmp_path), "--trainers", "cft", "--use_cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asks for FSDP" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("cft/rank*.json"))  # nothing trained
