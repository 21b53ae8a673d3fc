"""``diffgr2 convert``: turn an HF causal LM into a block-diffusion LM (the paper's "naive conversion").

    diffgr2 convert --model_name_or_path PATH --output_dir DIR --block_size 32 [--mask_token "<|mask|>"]
                    [--no_token_shift]

(``--model`` and ``--output`` are deprecated spellings of ``--model_name_or_path`` and ``--output_dir``.)
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..block_diffusion import convert_to_block_diffusion, get_spec
from ..modeling import load_model_and_tokenizer
from ._args import parse_command


@dataclass
class ConvertArguments:
    """Arguments of ``diffgr2 convert``.

    Parameters:
        model_name_or_path: directory (or hub id) of the AR causal LM.
        output_dir: directory to write the converted model and tokenizer to.
        block_size: tokens per block.
        mask_token: mask token string (default: the tokenizer's, else ``<|mask|>``).
        token_shift: AR token shift (recommended when converting an AR model).
        clean_block_causal: block-causal (BD3-LM) vs plain causal committed context.
        dtype: dtype to load and save in.
    """

    model_name_or_path: str = field(metadata={"help": "Directory or hub id of the AR causal LM."})
    output_dir: str = field(metadata={"help": "Output directory."})
    block_size: int = field(default=32, metadata={"help": "Tokens per block."})
    mask_token: str | None = field(default=None, metadata={"help": "Mask token string."})
    token_shift: bool = field(
        default=True,
        metadata={"help": "Predict each token from the position before it, as the AR model did (keep it on when "
                  "converting an AR model; --no_token_shift turns it off)."},
    )
    clean_block_causal: bool = field(default=True, metadata={"help": "Block-causal committed context."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[ConvertArguments]:
    return parse_command("convert", (ConvertArguments,), argv, values)


def run(args: ConvertArguments) -> dict[str, Any]:
    """Convert ``args.model_name_or_path`` and save it to ``args.output_dir``; returns the block-diffusion spec."""
    if args.block_size <= 0:
        raise SystemExit(f"--block_size must be a positive integer, got {args.block_size}.")
    model, tok = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype)
    convert_to_block_diffusion(model, tok, block_size=args.block_size, mask_token=args.mask_token,
                               token_shift=args.token_shift, clean_block_causal=args.clean_block_causal)
    model.save_pretrained(args.output_dir)
    tok.save_pretrained(args.output_dir)
    from ..rerank.pipeline_data import DATA_RECORD

    if (Path(args.model_name_or_path) / DATA_RECORD).is_file():  # the converted model knows the same items
        shutil.copyfile(Path(args.model_name_or_path) / DATA_RECORD, Path(args.output_dir) / DATA_RECORD)
    spec = get_spec(model)
    print(f"converted {args.model_name_or_path} -> {args.output_dir}: block_size={spec.block_size} "
          f"mask_token_id={spec.mask_token_id} token_shift={spec.token_shift}")
    return spec.to_dict()


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
