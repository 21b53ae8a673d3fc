"""``diffgr2 bench-train``: CFT step time / plain SFT step time on the same batch (ratio measured in one run).

    diffgr2 bench-train [--shape small] [--batch_size 8] [--prompt_len 300] [--completion_len 150] [--json PATH]
                        [--device cuda --dtype bfloat16 --attn_implementation flex_attention]

With ``--attn_implementation flex_attention`` the CFT loss is also computed under ``sdpa`` on the same weights and
noise, and the difference reported (``cft_loss_flex_minus_sdpa``): the check that the flex path trains the same
objective. Flex attention's backward needs a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bench.train import bench_train_step, compare_attention_losses
from ..block_diffusion import BlockDiffusionSpec
from ..modeling import build_model
from ..utils import atomic_write_text, set_threads
from ._args import parse_command


@dataclass
class BenchTrainArguments:
    """Arguments of ``diffgr2 bench-train``.

    Parameters:
        arch / shape / vocab_size: the locally built model.
        batch_size / prompt_len / completion_len: the batch (random tokens: speed needs no data).
        block_size: block size of the CFT objective.
        repeats: timed steps per method (median).
        device / dtype: where and in which precision the model runs.
        attn_implementation: ``sdpa`` or ``flex_attention`` (training's block mask as a flex ``BlockMask``).
        threads: torch intra-op CPU threads (0 or unset: torch's default).
        json: write the result there.
    """

    arch: str = field(default="qwen3", metadata={"help": "Architecture."})
    shape: str = field(default="small", metadata={"help": "Model shape."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size."})
    batch_size: int = field(default=8, metadata={"help": "Rows per batch."})
    prompt_len: int = field(default=300, metadata={"help": "Prompt tokens per row."})
    completion_len: int = field(default=150, metadata={"help": "Completion tokens per row."})
    block_size: int = field(default=32, metadata={"help": "CFT block size."})
    repeats: int = field(default=5, metadata={"help": "Timed steps per method."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or flex_attention."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    json: str | None = field(default=None, metadata={"help": "Write the result as JSON here."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchTrainArguments]:
    return parse_command("bench-train", (BenchTrainArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


def run(args: BenchTrainArguments) -> dict:
    """Time the steps; prints a line, writes ``args.json`` when set, returns the result."""
    from ..errors import UserError

    if args.attn_implementation not in ("sdpa", "flex_attention"):
        raise UserError(f"--attn_implementation must be sdpa or flex_attention, got {args.attn_implementation!r}.")
    if args.dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}.")
    if args.attn_implementation == "flex_attention" and not args.device.startswith("cuda"):
        raise UserError("flex_attention training needs a GPU (torch has no flex-attention backward on CPU); "
                        "use --device cuda, or --attn_implementation sdpa.")
    set_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.arch, vocab_size=args.vocab_size, shape=args.shape, pad_token_id=0, seed=args.seed,
                        attn_implementation=args.attn_implementation,
                        max_position_embeddings=max(2048, args.prompt_len + args.completion_len))
    model.to(device=args.device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    length = args.prompt_len + args.completion_len
    ids = torch.randint(3, args.vocab_size - 2, (args.batch_size, length), generator=g).to(args.device)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, args.prompt_len:] = 1
    spec = BlockDiffusionSpec(block_size=args.block_size, mask_token_id=args.vocab_size - 1)
    result = bench_train_step(model, ids, am, cm, spec, repeats=args.repeats)
    if args.attn_implementation == "flex_attention":
        result.update(compare_attention_losses(model, ids, am, cm, spec, reference="sdpa"))
    result.update(device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                  shape=args.shape, params=sum(p.numel() for p in model.parameters()), batch_size=args.batch_size,
                  prompt_len=args.prompt_len, completion_len=args.completion_len, block_size=args.block_size,
                  threads=torch.get_num_threads())
    print(f"SFT step {result['sft_step_s'] * 1000:.0f} ms | CFT step {result['cft_step_s'] * 1000:.0f} ms "
          f"({result['cft_over_sft']:.2f}x SFT) | CFT + complementary masks {result['cft_complementary_step_s'] * 1000:.0f} ms "
          f"({result['cft_complementary_over_sft']:.2f}x SFT) | first steps (warm-up, compilation) "
          + ", ".join(f"{k.removeprefix('first_step_s/')} {v:.2f} s" for k, v in result.items()
                      if k.startswith("first_step_s/"))
          + ("" if result.get("peak_memory_gb") is None else f" | peak memory {result['peak_memory_gb']}"))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result
