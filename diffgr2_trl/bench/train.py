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
    """Median seconds of a forward+backward+AdamW step for SFT and CFT (and CFT with complementary masks).

    Also returns each method's first step (``first_step_s/<method>``: warm-up, including compilation on the flex
    path) and, on CUDA, each method's peak allocated memory in GB (``peak_memory_gb``).
    """
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
    first: dict[str, float] = {}
    cuda = input_ids.device.type == "cuda"
    peak = {k: 0 for k in steps}
    model.train()
    for i in range(repeats + 1):
        for name, loss_fn in steps.items():  # interleaved, so load drifts hit every method alike
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
            if i > 0:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
            else:
                first[name] = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"first_step_s/{k}": v for k, v in first.items()},
        "peak_memory_gb": {k: round(v / 2**30, 2) for k, v in peak.items()} if cuda else None,
        "sft_step_s": med["sft"], "cft_step_s": med["cft"], "cft_complementary_step_s": med["cft_complementary"],
        "cft_over_sft": med["cft"] / med["sft"], "cft_complementary_over_sft": med["cft_complementary"] / med["sft"],
    }


def compare_attention_losses(model, input_ids, attention_mask, completion_mask, spec: BlockDiffusionSpec,
                             reference: str = "sdpa", seed: int = 0) -> dict:
    """The CFT loss of ``model`` under its own attention implementation and under ``reference`` on the same weights,
    batch and noise (``cft_loss_<impl>``, ``cft_loss_<reference>``, ``cft_loss_flex_minus_sdpa``-style difference)."""
    impl = model.config._attn_implementation
    batch = align_completions(input_ids, attention_mask, completion_mask.bool(), block_size=spec.block_size,
                              pad_token_id=0)
    from ..block_diffusion.noise import sample_noise_mask

    masked, _ = sample_noise_mask(batch.completion, batch.comp_start, spec,
                                  torch.Generator(device=input_ids.device).manual_seed(seed))
    losses = {}
    for name in (impl, reference):
        model.set_attn_implementation(name)
        with torch.no_grad():
            losses[name] = float(block_diffusion_loss(model, batch, spec, masked=masked)[0])
    model.set_attn_implementation(impl)
    short = {"flex_attention": "flex"}
    return {f"cft_loss_{short.get(impl, impl)}": losses[impl],
            f"cft_loss_{short.get(reference, reference)}": losses[reference],
            f"cft_loss_{short.get(impl, impl)}_minus_{reference}": losses[impl] - losses[reference]}
