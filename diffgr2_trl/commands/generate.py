"""``diffgr2 generate``: decode prompts with the block-diffusion sampler and show its parallelism.

    diffgr2 generate --model DIR --prompt "sort 3 1 2 : " --tau 0.9 [--max_new_tokens 128] [--tokens_per_step 4]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from ..block_diffusion import BlockDiffusionSampler, left_pad
from ._common import load_model_and_tokenizer


@dataclass
class GenerateArguments:
    """Arguments of ``diffgr2 generate``.

    Parameters:
        model: directory of a converted model.
        prompt: prompt text (repeat the flag for a batch).
        tau: confidence threshold (0, 1]; each step commits every position >= tau plus the most confident one.
        tokens_per_step: fixed schedule instead of tau.
        max_new_tokens: generation budget.
        temperature / top_k: sampling (0 = greedy).
        seed: random seed for sampling.
    """

    model: str = field(metadata={"help": "Directory of a converted block-diffusion model."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompt text; repeat for a batch."})
    tau: float = field(default=0.9, metadata={"help": "Confidence threshold in (0, 1]."})
    tokens_per_step: int | None = field(default=None, metadata={"help": "Fixed tokens per step (overrides tau)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum new tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k filter when sampling."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})


def main(argv: list[str]) -> int:
    (args,) = TrlParser((GenerateArguments,)).parse_args_and_config(argv)
    if not args.prompt:
        raise SystemExit("Give at least one --prompt.")
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype)
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids or [tok.bos_token_id] for p in args.prompt],
                         tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    sampler = BlockDiffusionSampler(model)
    t0 = time.perf_counter()
    out = sampler.generate(ids, mask, max_new_tokens=args.max_new_tokens, tau=args.tau,
                           tokens_per_step=args.tokens_per_step, temperature=args.temperature, top_k=args.top_k,
                           generator=torch.Generator().manual_seed(args.seed))
    dt = time.perf_counter() - t0
    for p, ids_r in zip(args.prompt, out.completion_ids):
        print(f"{p}{tok.decode(ids_r, skip_special_tokens=True)}")
    n = int(out.completion_mask.sum())
    print(f"[{n} tokens, {out.forward_passes} forward passes, {out.tokens_per_forward:.2f} tokens/forward, "
          f"{n / dt:.1f} tokens/s]")
    return 0
