"""Grouped-query attention without copying key/value heads, for masked attention on CPU.

transformers' ``sdpa`` attention copies every key/value head ``num_attention_heads / num_key_value_heads`` times
(``repeat_kv``) whenever it gets an attention mask on a CPU, because it reserves torch's native GQA
(``enable_gqa=True``) for the mask-free case. Decoding always passes a mask (left padding, block-diffusion
visibility), so each step copies the whole KV cache once per layer: measured on a 2-core Xeon, the copy was ~30% of a
batch-32 AR decode step of the cpu preset's ``mini`` teacher. torch's CPU kernel takes masks and ``enable_gqa``
together and returns the same values (bit for bit in our tests), so inside :func:`cpu_gqa_attention` the CPU path
uses it instead. Anything else (GPUs, where ``enable_gqa`` with a mask falls back to the math kernel; no GQA; extra
arguments such as ``position_bias``) goes to transformers' ``sdpa`` function unchanged.

How it is scoped. transformers' attention layers look their function up by ``config._attn_implementation`` on every
forward. The function is registered once under its own name, :data:`ATTN_IMPLEMENTATION` (with transformers'
``sdpa`` mask builder), which changes nothing for any model that does not name it; :func:`cpu_gqa_attention` sets
that name on the configs of the one model it is given, for the duration of the block, where they say ``"sdpa"``.
transformers' own ``"sdpa"`` entry is never replaced, so other models, and other threads using other models, are
untouched. Threads sharing one model share its config: a lock and a per-config count of the blocks inside make the
last one to leave restore ``"sdpa"``, so no thread's block loses the setting half-way (and both functions return the
same values, so a forward that sees either is right).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F

__all__ = ["ATTN_IMPLEMENTATION", "cpu_gqa_attention", "without_cpu_gqa_attention"]

ATTN_IMPLEMENTATION = "diffgr2_sdpa_cpu_gqa"
"""The name under which :func:`cpu_gqa_attention` registers its attention function with transformers."""

_lock = threading.Lock()
_inside: dict[int, int] = {}  # id(config) -> number of open cpu_gqa_attention blocks that switched it
_off = contextvars.ContextVar("diffgr2_cpu_gqa_off", default=False)
_registered = False


def _transformers_sdpa(*args, **kwargs):
    # Looked up per call, so that a user's own registration of "sdpa" is what the fallback runs.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def sdpa_cpu_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, except masked GQA on CPU, which runs torch's ``enable_gqa`` kernel."""
    if (
        query.device.type != "cpu"
        or attention_mask is None
        or key.shape[1] == query.shape[1]
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions", False)
    ):
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_cpu_gqa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks are built exactly as for sdpa
    _registered = True


def _configs(model: Any) -> list:
    """The model's config and its sub-configs (the attention layers of a multimodal model read a sub-config)."""
    inner = getattr(model, "module", model)  # DDP-style wrappers
    config = getattr(inner, "config", None)
    out, todo = [], [config] if config is not None and hasattr(config, "_attn_implementation_internal") else []
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        todo += [s for k in getattr(c, "sub_configs", {}) if (s := getattr(c, k, None)) is not None
                 and hasattr(s, "_attn_implementation_internal")]
    return out


@contextmanager
def cpu_gqa_attention(model: Any) -> Iterator[None]:
    """Inside the block, ``model`` (if it runs ``attn_implementation="sdpa"``) runs masked GQA on CPU without
    ``repeat_kv``; nothing else in the process changes (see the module docstring).

    Re-entrant and thread-safe; the model's configs say ``"sdpa"`` again once the last block using them exits, also
    on error. A model with another attention implementation, or no HF config, is left as it is.

    Args:
        model: the model whose forwards run inside the block (a DDP/PEFT wrapper is fine).
    """
    if _off.get():
        yield
        return
    _register()
    configs = []
    with _lock:
        for c in _configs(model):
            if _inside.get(id(c)) or c._attn_implementation_internal == "sdpa":
                c._attn_implementation_internal = ATTN_IMPLEMENTATION
                _inside[id(c)] = _inside.get(id(c), 0) + 1
                configs.append(c)
    try:
        yield
    finally:
        with _lock:
            for c in configs:
                _inside[id(c)] -= 1
                if not _inside[id(c)]:
                    del _inside[id(c)]
                    c._attn_implementation_internal = "sdpa"


@contextmanager
def without_cpu_gqa_attention() -> Iterator[None]:
    """The reference for measurements and tests: inside it (in this thread or task), :func:`cpu_gqa_attention`
    changes nothing, so every decoder runs transformers' own ``sdpa`` (with ``repeat_kv``)."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)
