"""Build small causal LMs and tokenizers locally, from a config (no hub access is ever needed), and load saved ones.

Tests and the CPU pipeline use these; the same library code runs unchanged on a real checkpoint path
(:func:`load_model_and_tokenizer`, the one loader every subcommand uses).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

# Shapes by name. "qwen3-0.6b" is the real Qwen3-0.6B shape (random weights) for speed measurements.
MODEL_SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # "mini": the CPU preset's re-ranker: a quarter of "small"'s compute per token, and it still learns to copy IDs.
    "mini": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "base": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=64),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1000000.0),
}
ARCHITECTURES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}


def build_model(
    arch: str = "qwen3",
    vocab_size: int = 128,
    shape: str | dict = "tiny",
    max_position_embeddings: int = 2048,
    attn_implementation: str = "sdpa",
    seed: int | None = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of a named (or given) shape, built from a config.

    Args:
        arch: ``"qwen3"``, ``"qwen2"`` or ``"llama"``.
        vocab_size: rows of the embedding; taken from ``tokenizer`` when one is given.
        shape: a key of ``MODEL_SHAPES`` or a dict of config fields.
        tokenizer: when given, its size and special token ids are written into the config.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}.")
    if isinstance(shape, str):
        if shape not in MODEL_SHAPES:
            raise ValueError(f"Unknown model shape {shape!r}; expected one of {sorted(MODEL_SHAPES)} or a dict.")
        shape = MODEL_SHAPES[shape]
    fields = dict(shape)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        fields.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    fields.update(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **overrides)
    fields.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(ARCHITECTURES[arch], **fields)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.float().eval()


def build_word_tokenizer(words: Iterable[str], extra_special_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (plus pad/eos/bos/unk), as an HF fast tokenizer.

    Useful for synthetic tasks and tests, where every token should be one id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS.values(), *extra_special_tokens, *words]:
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    extra = [t for t in extra_special_tokens if t not in SPECIAL_TOKENS.values()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def check_local_model(path: str) -> None:
    """A path that is (or looks like) a local directory must hold a saved model; a hub id ("org/name") passes."""
    from .errors import check_model_dir

    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") > 1
    if looks_local:
        check_model_dir(path)


def load_model_and_tokenizer(
    path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    add_tokens: Iterable[str] | None = None,
):
    """``(model, tokenizer)`` of a saved causal LM: a local directory, or a hub id on a machine that has the hub.

    Args:
        dtype: a key of :data:`DTYPES`.
        device: move the model there (default: where ``from_pretrained`` put it).
        add_tokens: tokens the tokenizer must hold as atoms (the re-ranker's task tokens). Missing ones are added, a
            pad token is set to EOS when the tokenizer has none, and the embeddings are resized with
            ``mean_resizing`` (new rows start at the mean embedding).

    The model is returned in eval mode (trainers switch it to train mode themselves).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}.")
    check_local_model(path)
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"Model directory {path!r} does not exist (and the hub is offline).")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if add_tokens is not None:
        missing = [t for t in add_tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    if add_tokens is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if device:
        model.to(device)
    return model.eval(), tokenizer
