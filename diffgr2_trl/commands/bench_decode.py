"""``diffgr2 bench-decode``: block-diffusion decode vs AR decode of the same weights, side by side.

    diffgr2 bench-decode [--model_name_or_path DIR | --shape small --arch qwen3] [--batch_sizes 1 16] [--new_tokens 128]
                         [--prompt_len 300] [--json PATH]

Without ``--model_name_or_path`` (``--model``: deprecated spelling) a randomly initialised model of a real shape is built locally (``--shape qwen3-0.6b`` is
Qwen3-0.6B's shape): speed needs no trained weights when the schedule is fixed (tokens per step). Tau rows on
random weights commit ~1 token per step (nothing is confident); give a trained model for meaningful tau rows.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bench.decode import bench_decode, format_rows
from ..utils import atomic_write_text, set_threads
from ._args import parse_command


@dataclass
class BenchDecodeArguments:
    """Arguments of ``diffgr2 bench-decode``.

    Parameters:
        model_name_or_path: converted model directory; omitted: a random model of ``shape`` is built.
        arch / shape / vocab_size: the random model (see ``diffgr2_trl.modeling.MODEL_SHAPES``).
        batch_sizes / block_sizes / tokens_per_step / taus: the grid.
        new_tokens / prompt_len: output and prompt lengths.
        repeats: timed repeats per row (median reported).
        device / dtype: where and how to run.
        compile: add the compiled rows: AR with transformers' static cache + ``torch.compile``, and the block sampler
            with its static cache + compiled step forward (CUDA graphs on a GPU, mode ``reduce-overhead``). Speedups
            are then against the faster AR row. ``compile_backend`` picks the torch.compile backend (``inductor``;
            ``eager`` only traces, for checking the path on a machine without a compiler).
        threads: torch intra-op CPU threads (0 or unset: torch's default).
        json: write ``{"rows": [...], "env": {...}}`` there.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Converted model dir (None: a random model)."})
    arch: str = field(default="qwen3", metadata={"help": "Architecture of the random model."})
    shape: str = field(default="small", metadata={"help": "Shape of the random model."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of the random model."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16], metadata={"help": "Batch sizes."})
    block_sizes: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "Block sizes (fixed rows)."})
    tokens_per_step: int = field(default=4, metadata={"help": "Tokens committed per step in the fixed rows."})
    taus: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5], metadata={"help": "Thresholds (tau rows)."})
    tau_block_size: int | None = field(default=None, metadata={"help": "Block size of the tau rows."})
    new_tokens: int = field(default=128, metadata={"help": "New tokens per row."})
    prompt_len: int = field(default=300, metadata={"help": "Prompt length."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats per row."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16."})
    compile: bool = field(default=False, metadata={"help": "Add compiled AR and block-sampler rows."})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the compiled rows."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed for the random model and prompts."})
    json: str | None = field(default=None, metadata={"help": "Write the rows as JSON here."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchDecodeArguments]:
    return parse_command("bench-decode", (BenchDecodeArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


def _compile_options(args: BenchDecodeArguments) -> dict | bool:
    if not args.compile:
        return False
    options = {"dynamic": False, "backend": args.compile_backend}
    if args.compile_backend == "inductor":
        options["mode"] = "reduce-overhead"  # CUDA graphs on a GPU
    return options


def run(args: BenchDecodeArguments) -> dict:
    """Run the grid; prints the table, writes ``args.json`` when set, returns ``{"rows", "env"}``."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    mask_id = None
    if args.model_name_or_path:
        from ..modeling import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype, device=args.device)
        vocab = model.config.vocab_size
    else:
        from ..modeling import build_model

        model = build_model(args.arch, vocab_size=args.vocab_size, shape=args.shape, pad_token_id=0,
                            max_position_embeddings=max(2048, args.prompt_len + args.new_tokens + 64),
                            seed=args.seed).to(device=args.device, dtype=dtype)
        vocab, mask_id = args.vocab_size, args.vocab_size - 1
    prompts = torch.randint(3, vocab - 2, (max(args.batch_sizes), args.prompt_len), device=args.device)
    rows = bench_decode(model, prompts, new_tokens=args.new_tokens, batch_sizes=tuple(args.batch_sizes),
                        block_sizes=tuple(args.block_sizes), tokens_per_step=args.tokens_per_step,
                        taus=tuple(args.taus), tau_block_size=args.tau_block_size, repeats=args.repeats,
                        mask_token_id=mask_id, compile=_compile_options(args))
    params = sum(p.numel() for p in model.parameters())
    env = {"device": args.device, "dtype": args.dtype, "compile": _compile_options(args), "threads": torch.get_num_threads(), "params": params,
           "model": args.model_name_or_path or f"random {args.arch}/{args.shape} vocab {args.vocab_size}",
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine()}
    print(f"model: {env['model']} ({params / 1e6:.1f}M params), {args.device}, {args.dtype}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(format_rows(rows))
    result = {"rows": [r.to_dict() for r in rows], "env": env}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result
