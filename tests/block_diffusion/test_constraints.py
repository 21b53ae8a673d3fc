"""The sampler's constraint hooks: both logits writes (sparse, dense) equal a dense reference, position by position."""

import random

import pytest
import torch

from diffgr2_trl.block_diffusion import constraints as constraints_module
from diffgr2_trl.block_diffusion.constraints import MASKED, constrain_logits, keep_consistent
from diffgr2_trl.rerank.constraints import NOTHING, Allowed

VOCAB = 30
ANSWERS = [Allowed(), Allowed(banned=frozenset({1, 2, 29})), Allowed(banned=frozenset({4})),
           Allowed(only=frozenset({7})), Allowed(only=frozenset({3, 8, 20})), Allowed(only=frozenset({0, 29})), NOTHING]


class ScriptedConstraint:
    """Answers each position with a fixed (seeded) choice among ``ANSWERS``; consistency by a banned token."""

    def __init__(self, seed: int, bad_token: int = 29) -> None:
        self.rng, self.bad_token = random.Random(seed), bad_token
        self.asked: list[list[int]] = []

    def allowed_many(self, canvas, positions):
        self.asked.append(list(positions))
        # some positions of a row must stay eligible, as a real constraint guarantees
        return [self.rng.choice(ANSWERS[:-1] if i == 0 else ANSWERS) for i, _ in enumerate(positions)]

    def consistent(self, canvas):
        return canvas.count(self.bad_token) <= 1


@pytest.mark.parametrize("dense_limit", [0, 1 << 30], ids=["sparse", "dense"])
@pytest.mark.parametrize("seed", range(5))
def test_the_logits_write_equals_a_dense_reference(seed, dense_limit, monkeypatch):
    monkeypatch.setattr(constraints_module, "DENSE_LIMIT", dense_limit)
    torch.manual_seed(seed)
    batch, cols = 4, 6
    logits = torch.randn(batch, cols, VOCAB)
    masked = torch.rand(batch, cols) < 0.7
    masked[:, 0] = True
    constraints = [ScriptedConstraint(seed * 10 + r) if r != 2 else None for r in range(batch)]
    replay = [ScriptedConstraint(seed * 10 + r) if r != 2 else None for r in range(batch)]
    canvases = {r: [MASKED] * 10 for r in (0, 1, 3)}
    positions = list(range(4, 4 + cols))
    out, eligible = constrain_logits(logits.clone(), masked, positions, canvases, constraints)

    expected, want_eligible = logits.clone(), masked.clone()
    for r in (0, 1, 3):
        masked_cols = [c for c in range(cols) if masked[r, c]]
        for c, allowed in zip(masked_cols, replay[r].allowed_many(canvases[r], [positions[c] for c in masked_cols])):
            keep = allowed.vocab_mask(VOCAB)
            if not keep.any():
                want_eligible[r, c] = False  # nothing allowed yet: left as it was, never committed
            else:
                expected[r, c] = expected[r, c].masked_fill(~keep, float("-inf"))
    assert torch.equal(out, expected)
    assert torch.equal(eligible, want_eligible)
    assert torch.equal(out[2], logits[2])  # an unconstrained row is untouched
    assert constraints[0].asked[0] == [positions[c] for c in range(cols) if masked[0, c]]


def test_a_row_with_nothing_allowed_anywhere_is_a_dead_end():
    class Stuck:
        def allowed_many(self, canvas, positions):
            return [NOTHING] * len(positions)

    with pytest.raises(RuntimeError, match="Row 0: .*dead end"):
        constrain_logits(torch.zeros(1, 2, VOCAB), torch.ones(1, 2, dtype=torch.bool), [0, 1], {0: [MASKED] * 2},
                         [Stuck()])


def test_keep_consistent_drops_the_less_confident_clash():
    commit = torch.tensor([[True, True, True]])
    tokens = torch.tensor([[29, 5, 29]])
    confidence = torch.tensor([[0.2, 0.5, 0.9]])
    canvas = {0: [MASKED] * 3}
    kept = keep_consistent(commit, tokens, confidence, [0, 1, 2], canvas, [ScriptedConstraint(0)])
    assert kept.tolist() == [[False, True, True]]  # the second 29 (less confident) would break the rule
    assert canvas[0] == [MASKED, 5, 29]
