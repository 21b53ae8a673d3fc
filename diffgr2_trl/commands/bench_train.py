"""``diffgr2 bench-train``: CFT step time / plain SFT step time on the same batch (ratio measured in one run).

    diffgr2 bench-train [--shape small] [--batch_size 8] [--prompt_len 300] [--completion_len 150] [--json PATH]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bench.train import bench_train_step
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
    threads: int | None = field(default=None, metadata={"help": "torch intra-op CPU threads (default: torch's)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    json: str | None = field(default=None, metadata={"help": "Write the result as JSON here."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchTrainArguments]:
    return parse_command("bench-train", (BenchTrainArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


def run(args: BenchTrainArguments) -> dict:
    """Time the steps; prints a line, writes ``args.json`` when set, returns the result."""
    set_threads(args.threads)
    model = build_model(args.arch, vocab_size=args.vocab_size, shape=args.shape, pad_token_id=0, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    length = args.prompt_len + args.completion_len
    ids = torch.randint(3, args.vocab_size - 2, (args.batch_size, length), generator=g)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, args.prompt_len:] = 1
    spec = BlockDiffusionSpec(block_size=args.block_size, mask_token_id=args.vocab_size - 1)
    result = bench_train_step(model, ids, am, cm, spec, repeats=args.repeats)
    result.update(shape=args.shape, params=sum(p.numel() for p in model.parameters()), batch_size=args.batch_size,
                  prompt_len=args.prompt_len, completion_len=args.completion_len, block_size=args.block_size,
                  threads=torch.get_num_threads())
    print(f"SFT step {result['sft_step_s'] * 1000:.0f} ms | CFT step {result['cft_step_s'] * 1000:.0f} ms "
          f"({result['cft_over_sft']:.2f}x SFT) | CFT + complementary masks {result['cft_complementary_step_s'] * 1000:.0f} ms "
          f"({result['cft_complementary_over_sft']:.2f}x SFT)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result
