"""AR -> block-diffusion conversion of any HF causal LM (the paper's "naive conversion").

Conversion changes no weight except, when needed, new embedding rows for the mask token. What makes the model a
block-diffusion model is how it is *used*: the spec saved in its config, the masks, the objective and the sampler.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .likelihood import check_output_logits
from .masks import dense_mask, to_model_mask
from .spec import BlockDiffusionSpec, set_spec

DEFAULT_MASK_TOKEN = "<|mask|>"
MASK_HONOURING_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")



@contextlib.contextmanager
def _without_log_notice(logger_name: str, prefix: str):
    """Within the block, drop ``logger_name``'s records of level <= WARNING whose message starts with ``prefix``."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not str(record.msg).startswith(prefix)

    if os.environ.get("DIFFGR2_SHOW_ALL_WARNINGS"):  # the user asked for every notice
        yield
        return
    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)

def _resolve_mask_token(tokenizer, mask_token: str | None) -> tuple[int, bool]:
    """Return ``(mask_token_id, added)``; refuse a mask token that is also an ordinary or special token."""
    reserved = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "eos", "bos", "unk")
    }
    if mask_token is None:
        if getattr(tokenizer, "mask_token", None) is not None:
            mask_token = tokenizer.mask_token
        else:
            mask_token = DEFAULT_MASK_TOKEN
    vocab = tokenizer.get_vocab()
    added = False
    if mask_token in vocab:
        mask_id = vocab[mask_token]
        special = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        }
        if mask_token not in special:
            raise ValueError(
                f"Mask token {mask_token!r} (id {mask_id}) is an ordinary token of the vocabulary: text containing it "
                "would be read as masked. Pass a string that is not in the vocabulary (e.g. '<|mask|>'), or an "
                "existing special token reserved for masking."
            )
    else:
        tokenizer.add_special_tokens({"mask_token": mask_token})
        mask_id = tokenizer.convert_tokens_to_ids(mask_token)
        added = True
    for name, tid in reserved.items():
        if tid is not None and tid == mask_id:
            raise ValueError(
                f"Mask token {mask_token!r} has id {mask_id}, the same as the tokenizer's {name} token; the mask token "
                "must be a token of its own."
            )
    if getattr(tokenizer, "mask_token", None) != mask_token:
        tokenizer.mask_token = mask_token
    return mask_id, added


def check_full_attention(config) -> None:
    """Refuse a model whose layers attend through a sliding window (Mistral, Gemma 2/3, Qwen2 with sliding layers):
    the block-diffusion masks are built for full attention, and a window the model applies on top (its KV cache
    keeps only the window) would hide part of the clean context without an error.

    ``layer_types``, where the config has it, is what the attention layers read, so it decides (Qwen2 with
    ``use_sliding_window=True`` but ``max_window_layers`` >= its layers is full attention). A window at least as long
    as ``max_position_embeddings`` (Phi-3.5-mini) never hides anything the model can see, so it is accepted too.
    """
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = "sliding_attention" in layer_types
    else:
        sliding = window is not None and getattr(config, "use_sliding_window", True) is not False
    context = getattr(config, "max_position_embeddings", None)
    if sliding and window is not None and context is not None and window >= context:
        sliding = False
    if sliding:
        raise ValueError(
            f"{type(config).__name__} uses sliding-window attention (sliding_window={window!r}"
            + (", sliding_attention layers" if layer_types is not None else "") + f", max_position_embeddings="
            f"{context!r}), which block diffusion does not support yet: its masks assume full attention. If every "
            "training and decoding sequence, noisy streams included, stays inside the window, set "
            "config.sliding_window = None (and layer_types to full attention) before converting.")


def check_no_router_aux_loss(config) -> None:
    """Refuse a mixture-of-experts model set to return router logits: HF adds the load-balancing loss to its own
    loss, which the block-diffusion trainers do not use, so the balance term would be dropped without a word."""
    config = getattr(config, "text_config", None) or config
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            f"{type(config).__name__} has output_router_logits=True: its router load-balancing loss would be "
            "ignored (the block-diffusion losses are computed outside the model's loss). Set "
            "model.config.output_router_logits = False to train without it, knowingly.")


def check_attention_honours_masks(model) -> None:
    """Probe with a tiny forward that the attention implementation applies custom 4-D masks.

    Implementations such as flash-attention silently apply their own causal mask; block diffusion would then train
    and decode with the wrong visibility. The probe asks for a *non-causal* pattern (token 0 sees token 1) and
    checks that token 0's output changes relative to the causal pattern. The trainers call it, so it also refuses
    what would train wrongly without an error: sliding-window attention (:func:`check_full_attention`), an
    ignored router loss (:func:`check_no_router_aux_loss`) and logit post-processing the replay cannot reproduce
    (:func:`~diffgr2_trl.block_diffusion.likelihood.check_output_logits`).
    """
    check_full_attention(model.config)
    check_no_router_aux_loss(model.config)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASK_HONOURING_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={impl!r} does not apply custom 4-D attention masks, which block diffusion needs. "
            "Load the model with attn_implementation='sdpa' (or 'eager' / 'flex_attention')."
        )
    check_output_logits(model)
    if impl == "flex_attention":
        return  # masks are BlockMasks there, built from the same rule as the dense path
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2]], device=device) % model.config.vocab_size
    cols = torch.arange(2, device=device)
    zeros = torch.zeros(2, dtype=torch.long, device=device)
    valid = torch.ones(1, 2, dtype=torch.bool, device=device)
    causal = dense_mask(zeros, cols, zeros, cols, valid, comp_start=2, block_size=1, clean_block_causal=False)
    full = torch.ones_like(causal)
    outs = []
    with torch.no_grad():
        for m in (causal, full):
            out = model(input_ids=ids, attention_mask=to_model_mask(m, impl, model.dtype), use_cache=False)
            outs.append(out.logits[0, 0].float())
    if torch.allclose(outs[0], outs[1]):
        raise ValueError(
            f"attn_implementation={impl!r} ignored a custom 4-D attention mask in a probe forward (a non-causal mask "
            "gave the causal result). Load the model with attn_implementation='sdpa' or 'eager'."
        )


def convert_to_block_diffusion(
    model,
    tokenizer,
    block_size: int = 32,
    *,
    mask_token: str | None = None,
    token_shift: bool = True,
    clean_block_causal: bool = True,
    check_attention: bool = True,
    **spec_kwargs,
):
    """Turn an HF causal LM + tokenizer into a block-diffusion LM (in place) and return ``(model, tokenizer)``.

    Adds a mask token when the tokenizer has none (resizing the embeddings only when the vocabulary has no spare
    row), writes a :class:`BlockDiffusionSpec` into ``model.config.block_diffusion`` (round-trips through
    ``save_pretrained`` / ``from_pretrained`` with stock transformers), and checks that the attention
    implementation honours custom masks.

    Args:
        block_size: tokens per block (paper: 32).
        mask_token: string of the mask token; default: the tokenizer's mask token, else ``"<|mask|>"``.
        token_shift, clean_block_causal, **spec_kwargs: fields of :class:`BlockDiffusionSpec`.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    check_full_attention(model.config)
    mask_id, added = _resolve_mask_token(tokenizer, mask_token)
    rows = model.get_input_embeddings().weight.shape[0]
    if mask_id >= rows:
        # Mean-initialise so the new row does not dominate early training; transformers does this by default (and
        # announces it on every call: dropped here, where it is the intended behaviour, and nowhere else).
        with _without_log_notice("transformers.modeling_utils", "The new "):
            model.resize_token_embeddings(mask_id + 1, mean_resizing=True)
    elif added:
        # A spare row (e.g. Qwen pads its vocabulary to a multiple of 64): give it the mean embedding too.
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[mask_id] = emb[: len(tokenizer) - 1].mean(0)
    spec = BlockDiffusionSpec(
        block_size=block_size, mask_token_id=mask_id, token_shift=token_shift,
        clean_block_causal=clean_block_causal, **spec_kwargs,
    )
    set_spec(model, spec)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if check_attention:
        check_attention_honours_masks(model)
    return model, tokenizer
