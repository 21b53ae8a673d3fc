"""Training overhead: one CFT step vs one plain SFT (AR cross-entropy) step on the same batch and weights."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..block_diffusion import BlockDiffusionSpec, align_completions, block_diffusion_loss


def _sft_loss(model, ids, am, completion):
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1].float()
    target = ids[:, 1:].masked_fill(~completion[:, 1:], -100)
    return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)


def bench_train_step(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    spec: BlockDiffusionSpec,
    *,
    repeats: int = 5,
    pad_token_id: int = 0,
) -> dict:
    """Median seconds of a forward+backward+AdamW step for SFT and CFT (and CFT with complementary masks)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    completion = completion_mask.bool()
    batch = align_completions(input_ids, attention_mask, completion, block_size=spec.block_size,
                              pad_token_id=pad_token_id)
    comp_spec = BlockDiffusionSpec(**{**spec.to_dict(), "complementary_masks": True})
    steps = {
        "sft": lambda: _sft_loss(model, input_ids, attention_mask, completion),
        "cft": lambda: block_diffusion_loss(model, batch, spec)[0],
        "cft_complementary": lambda: block_diffusion_loss(model, batch, comp_spec)[0],
    }
    times = {k: [] for k in steps}
    model.train()
    for i in range(repeats + 1):
        for name, loss_fn in steps.items():  # interleaved, so load drifts hit every method alike
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "sft_step_s": med["sft"], "cft_step_s": med["cft"], "cft_complementary_step_s": med["cft_complementary"],
        "cft_over_sft": med["cft"] / med["sft"], "cft_complementary_over_sft": med["cft_complementary"] / med["sft"],
    }
