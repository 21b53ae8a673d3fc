"""``diffgr2 generate``: decode prompts with the block-diffusion sampler and show its parallelism.

    diffgr2 generate --model_name_or_path DIR --prompt "sort 3 1 2 : " --tau 0.9 [--max_completion_length 128]
                     [--tokens_per_step 4] [--temperature 0.7 --top_k 20]

The decoding options are :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`'s fields (``--max_new_tokens`` and
``--model`` are deprecated spellings of ``--max_completion_length`` and ``--model_name_or_path``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..block_diffusion import BlockDecodingConfig, BlockDiffusionSampler, left_pad
from ..modeling import load_model_and_tokenizer
from ._args import parse_command


@dataclass
class GenerateArguments:
    """Arguments of ``diffgr2 generate`` besides the decoding options (:class:`BlockDecodingConfig`).

    Parameters:
        model_name_or_path: directory of a converted model.
        prompt: prompt texts, one row each (several after one ``--prompt``, or the flag repeated).
        seed: random seed for sampling.
        dtype: model dtype.
        constrained: decode only valid rankings of the candidates each re-ranking prompt lists (read from the prompt,
            as ``diffgr2 prepare`` writes it); see :mod:`diffgr2_trl.rerank.constraints`.
    """

    model_name_or_path: str = field(metadata={"help": "Directory of a converted block-diffusion model."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompt text; several after one --prompt, or the flag repeated, for a batch.", "action": "extend"})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    constrained: bool = field(default=False, metadata={"help": "Decode only valid rankings of the prompt's candidates."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(GenerateArguments, BlockDecodingConfig)``."""
    return parse_command("generate", (GenerateArguments, BlockDecodingConfig), argv, values)


def run(args: GenerateArguments, decoding: BlockDecodingConfig) -> list[str]:
    """Decode ``args.prompt`` with ``decoding``; prints and returns the completions."""
    if not args.prompt:
        raise SystemExit("Give at least one --prompt.")
    model, tok = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype)
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids or [tok.bos_token_id] for p in args.prompt],
                         tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    sampler = BlockDiffusionSampler(model, config=decoding)
    constraints = _constraints(args.prompt, tok, decoding, sampler) if args.constrained else None
    t0 = time.perf_counter()
    out = sampler.generate(ids, mask, generator=torch.Generator().manual_seed(args.seed), constraints=constraints)
    dt = time.perf_counter() - t0
    texts = [tok.decode(ids_r, skip_special_tokens=True) for ids_r in out.completion_ids]
    for p, text in zip(args.prompt, texts):
        print(f"{p}{text}")
    n = int(out.completion_mask.sum())
    print(f"[{n} tokens, {out.forward_passes} forward passes, {out.tokens_per_forward:.2f} tokens/forward, "
          f"{n / dt:.1f} tokens/s]")
    return texts


def _constraints(prompts: list[str], tok, decoding: BlockDecodingConfig, sampler: BlockDiffusionSampler):
    from ..errors import UserError
    from ..rerank.constraints import RankingConstraint
    from ..rerank.prompts import parse_prompt

    rows = []
    for i, prompt in enumerate(prompts):
        try:
            _, candidates = parse_prompt(prompt)
        except ValueError as e:
            raise UserError(f"--constrained needs re-ranking prompts; prompt {i + 1}: {e}") from None
        if not candidates:
            raise UserError(f"--constrained: prompt {i + 1} lists no candidate IDs.")
        rows.append([c.sid for c in candidates])
    # the sampler's stop tokens; the answer closes with the tokenizer's EOS when it is one (as in evaluate)
    stops = set(sampler.eos_token_ids) | set(decoding.stop_token_ids or [])
    return RankingConstraint.for_rows(tok, rows, decoding.max_completion_length, stops)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
