"""Every trainer under DDP: two real CPU processes (gloo), launched as the README says, match one process.

One launch (``examples/accelerate/ddp.yaml``, ``--use_cpu``) trains CFT, OPD and diffusion GRPO in turn
(``tests/trainers/ddp_train.py``: deterministic settings, SGD, rows of unequal length, 2 accumulation steps); while it
runs, the same script trains each trainer in this process with the whole global batch in one micro-batch. Then, per trainer: both ranks wrote a record (world size 2, ranks {0, 1}, gloo), the
ranks hold identical weights, and the two-process weights and losses equal the one-process ones.

Tolerance: the two runs do the same arithmetic in a different order (a gloo all-reduce of two half-batch gradients
vs one backward over the whole batch), so float32 results differ in the last bits: measured, the weights after 3 SGD
steps at lr 0.1 agree to 1e-8 (CFT, GRPO) and 1.2e-7 (OPD), the losses to ~3e-7. The test allows 1e-4, while
training moves the weights by 3-5e-2 (asserted > 1e-2) and a one-process run with the per-device batch instead of
the global one (what a rank training alone, without gradient sync, would compute) ends 2-5e-2 away from the
two-process weights.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers import LAUNCH, REPO, launch_env
from tests.trainers import ddp_train

PER_DEVICE = 2
ACCUMULATION = 2
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(two_process_dir, one_process_dir, initial_params)`` once for the module; both runs go in parallel."""
    two = tmp_path_factory.mktemp("ddp2")
    one = tmp_path_factory.mktemp("ddp1")
    # The README's CPU line: the example DDP config, --use_cpu.
    cmd = [*LAUNCH, "tests/trainers/ddp_train.py", "--output_dir", str(two),
           "--per_device_train_batch_size", str(PER_DEVICE), "--max_steps", str(STEPS), "--use_cpu",
           "--gradient_accumulation_steps", str(ACCUMULATION)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name in ddp_train.TRAINERS:
                ddp_train.train(name, one, 2 * PER_DEVICE * ACCUMULATION, STEPS)
        finally:
            torch.set_num_threads(threads)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]
    initial = dict(ddp_train._model()[0].named_parameters())
    return two, one, initial


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one worker: the module's launch (the `runs` fixture) happens once, not per worker
@pytest.mark.parametrize("trainer", ddp_train.TRAINERS)
def test_two_cpu_processes_match_one_process(runs, trainer):
    two, one, initial = runs
    records = [json.loads(p.read_text()) for p in sorted((two / trainer).glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1], records
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["global_step"] == STEPS for r in records)
    assert records[0]["param_checksum"] == records[1]["param_checksum"]  # DDP kept the ranks in sync
    [ref] = [json.loads(p.read_text()) for p in (one / trainer).glob("rank*.json")]
    assert ref["world_size"] == 1
    # Rank 0 logs the loss averaged over both processes: the global batch's loss, step by step.
    torch.testing.assert_close(records[0]["losses"], ref["losses"], atol=1e-4, rtol=0)
    p2 = torch.load(two / trainer / "params.pt")
    p1 = torch.load(one / trainer / "params.pt")
    assert p2.keys() == p1.keys()
    moved = max((p1[n] - initial[n].detach()).abs().max().item() for n in p1)
    assert moved > 1e-2, moved
    diff = max((p2[n] - p1[n]).abs().max().item() for n in p1)
    assert diff < 1e-4, (diff, moved)
