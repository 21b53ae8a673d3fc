"""CFT and OPD losses are means over the whole optimizer step, whatever its split into micro-batches.

One process, SGD, the deterministic settings of ``tests/trainers/ddp_train.py`` (lists of 2 to 6 values, so the
micro-batches of a step hold different token counts): the same global batch in one micro-batch or in two accumulated
ones gives the same weights. A per-micro-batch mean divided by the accumulation steps (what the trainers computed
before) weights the tokens of a short micro-batch more; the CFT case checks that this data tells the two apart.
(The two-process version of the same check, with unequal counts per rank, is ``test_ddp.py``.)
"""

from __future__ import annotations

import pytest
import torch

from tests.trainers import ddp_train


def _params(name, out, per_device, accumulation, steps=2):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_train.train(name, out, per_device, steps, accumulation=accumulation)
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / name / "params.pt")


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("name", ["cft", "opd"])
def test_accumulated_micro_batches_equal_one_batch(name, tmp_path, monkeypatch):
    one = _params(name, tmp_path / "one", 4, 1)
    two = _params(name, tmp_path / "two", 2, 2)
    initial = dict(ddp_train._model()[0].named_parameters())
    moved = max((one[n] - initial[n].detach()).abs().max().item() for n in one)
    assert moved > 1e-2, moved
    assert _max_diff(one, two) < 1e-5, (_max_diff(one, two), moved)
    if name == "cft":
        from diffgr2_trl.trainers import BlockDiffusionTrainer

        # Per-micro-batch means (no step-wide normaliser): the accumulated run no longer equals the one-batch run.
        def per_micro_batch(self, epoch_iterator, num_batches, device):
            out = super(BlockDiffusionTrainer, self).get_batch_samples(epoch_iterator, num_batches, device)
            self._step_weight = None
            return out

        monkeypatch.setattr(BlockDiffusionTrainer, "loss_is_scaled_for_ga", False)
        monkeypatch.setattr(BlockDiffusionTrainer, "get_batch_samples", per_micro_batch)
        naive = _params(name, tmp_path / "naive", 2, 2)
        assert _max_diff(one, naive) > 1e-3, _max_diff(one, naive)


def test_a_direct_cft_loss_after_training_uses_its_own_normaliser(tmp_path):
    """The step-wide normaliser belongs to the step's micro-batches; a ``compute_loss`` call after ``train()`` (model
    still in train mode) must be the batch's own mean, the same as in eval mode, not scaled by the last step's
    token count."""
    trainer = ddp_train._trainer("cft", str(tmp_path), per_device=2, max_steps=1, use_cpu=True, accumulation=2)
    trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    losses = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            torch.manual_seed(0)
            losses[mode] = trainer.compute_loss(model, batch).item()
    assert losses["train"] == pytest.approx(losses["eval"], rel=1e-6), losses
