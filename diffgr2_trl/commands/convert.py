"""``diffgr2 convert``: turn an HF causal LM into a block-diffusion LM (the paper's "naive conversion").

    diffgr2 convert --model PATH --output DIR --block-size 32 [--mask_token "<|mask|>"] [--no_token_shift]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import TrlParser

from ..block_diffusion import convert_to_block_diffusion, get_spec
from ._common import load_model_and_tokenizer


@dataclass
class ConvertArguments:
    """Arguments of ``diffgr2 convert``.

    Parameters:
        model: directory (or hub id) of the AR causal LM.
        output: directory to write the converted model and tokenizer to.
        block_size: tokens per block.
        mask_token: mask token string (default: the tokenizer's, else ``<|mask|>``).
        token_shift: AR token shift (recommended when converting an AR model).
        clean_block_causal: block-causal (BD3-LM) vs plain causal committed context.
        dtype: dtype to load and save in.
    """

    model: str = field(metadata={"help": "Directory or hub id of the AR causal LM."})
    output: str = field(metadata={"help": "Output directory."})
    block_size: int = field(default=32, metadata={"help": "Tokens per block."})
    mask_token: str | None = field(default=None, metadata={"help": "Mask token string."})
    token_shift: bool = field(default=True, metadata={"help": "AR token shift."})
    clean_block_causal: bool = field(default=True, metadata={"help": "Block-causal committed context."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})


def main(argv: list[str]) -> int:
    (args,) = TrlParser((ConvertArguments,)).parse_args_and_config(argv)
    if args.block_size <= 0:
        raise SystemExit(f"--block_size must be a positive integer, got {args.block_size}.")
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype)
    convert_to_block_diffusion(model, tok, block_size=args.block_size, mask_token=args.mask_token,
                               token_shift=args.token_shift, clean_block_causal=args.clean_block_causal)
    model.save_pretrained(args.output)
    tok.save_pretrained(args.output)
    spec = get_spec(model)
    print(f"converted {args.model} -> {args.output}: block_size={spec.block_size} mask_token_id={spec.mask_token_id} "
          f"token_shift={spec.token_shift}")
    return 0
