"""Grouped-query attention without copying key/value heads, for masked attention on CPU.

transformers' ``sdpa`` attention copies every key/value head ``num_attention_heads / num_key_value_heads`` times
(``repeat_kv``) whenever it gets an attention mask on a CPU, because it reserves torch's native GQA
(``enable_gqa=True``) for the mask-free case. Decoding always passes a mask (left padding, block-diffusion
visibility), so each step copies the whole KV cache once per layer: measured on a 2-core Xeon, the copy was ~30% of a
batch-32 AR decode step of the cpu preset's ``mini`` teacher. torch's CPU kernel takes masks and ``enable_gqa``
together and returns the same values (bit for bit in our tests), so inside :func:`cpu_gqa_attention` the CPU path
uses it instead. Anything else (GPUs, where ``enable_gqa`` with a mask falls back to the math kernel; no GQA; extra
arguments such as ``position_bias``) goes to transformers' function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.nn.functional as F

__all__ = ["cpu_gqa_attention", "without_cpu_gqa_attention"]


def _gqa_sdpa(fallback: Callable) -> Callable:
    def sdpa_cpu_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if (
            query.device.type != "cpu"
            or attention_mask is None
            or key.shape[1] == query.shape[1]
            or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None
            or kwargs.get("output_attentions", False)
        ):
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    sdpa_cpu_gqa.fallback = fallback
    return sdpa_cpu_gqa


@contextmanager
def _registered(make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Install ``make(current sdpa entry)`` unless one of ours is installed already; restore the registry on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(before, "fallback", None) is not None:  # already inside (either context): leave it as it is
        yield
        return
    ALL_ATTENTION_FUNCTIONS["sdpa"] = make(before)  # a local entry of this registry instance
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # drops the local entry only: a later global register() stays visible
        if ALL_ATTENTION_FUNCTIONS["sdpa"] is not before:  # someone else's local entry was there before ours
            ALL_ATTENTION_FUNCTIONS["sdpa"] = before


def cpu_gqa_attention():
    """Inside the block, models with ``attn_implementation="sdpa"`` run masked GQA on CPU without ``repeat_kv``.

    Re-entrant; the previous ``sdpa`` entry of transformers' attention registry is restored on exit.
    """
    return _registered(_gqa_sdpa)


def _passthrough(fallback: Callable) -> Callable:
    def sdpa(*args, **kwargs):
        return fallback(*args, **kwargs)

    sdpa.fallback = fallback
    return sdpa


def without_cpu_gqa_attention():
    """The reference for measurements and tests: inside it, :func:`cpu_gqa_attention` changes nothing, so every
    decoder runs transformers' own ``sdpa`` (with ``repeat_kv``)."""
    return _registered(_passthrough)
