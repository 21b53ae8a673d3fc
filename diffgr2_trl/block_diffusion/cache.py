"""The block sampler's KV caches: a dynamic cache that appends in place, row selection, and static-cache cropping.

A block step appends its canvas to the cache, attends, and crops the canvas off again (only committed tokens stay
cached). ``transformers``' ``DynamicLayer`` appends with ``torch.cat``, i.e. copies the whole cache of every layer at
every forward; :class:`ReservedLayer` keeps keys and values in a buffer with room to spare, so appending writes only
the new columns and cropping moves the end.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

__all__ = ["ReservedLayer", "cache_rows", "crop_static", "reserved_cache"]


class ReservedLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose keys and values are the first ``length`` columns of
    buffers of ``capacity`` columns (grown, by doubling, only if a write would pass the end).

    ``keys`` / ``values`` are views of the buffers, so a model reads them as it reads a ``DynamicLayer``'s.
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def _views(self) -> None:
        self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]

    def _reserve(self, shape: torch.Size, columns: int, dtype, device) -> None:
        if self._keys is not None and columns <= self._keys.shape[-2]:
            return
        size = max(columns, self.capacity, 2 * (self._keys.shape[-2] if self._keys is not None else 0))
        keys = torch.empty(*shape[:-2], size, shape[-1], dtype=dtype, device=device)
        values = torch.empty_like(keys)
        if self.length:
            keys[..., : self.length, :] = self._keys[..., : self.length, :]
            values[..., : self.length, :] = self._values[..., : self.length, :]
        self._keys, self._values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        end = self.length + key_states.shape[-2]
        self._reserve(key_states.shape, end, key_states.dtype, key_states.device)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` columns (a negative count, as ``DynamicLayer.crop`` takes)."""
        if tokens_to_remove > 0:
            raise ValueError("ReservedLayer.crop takes the (negative) number of columns to remove.")
        if tokens_to_remove and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def select_rows(self, index: torch.Tensor, spare: int | None = None) -> ReservedLayer:
        """A new layer holding rows ``index`` of this one's columns, with ``spare`` free columns after them (None: as
        many as this layer has)."""
        if spare is None:
            spare = (self._keys.shape[-2] if self._keys is not None else self.capacity) - self.length
        new = ReservedLayer(self.length + spare)
        if self.is_initialized:
            new.dtype, new.device, new.is_initialized = self.dtype, self.device, True
            if self.length:
                shape = torch.Size((index.numel(), *self._keys.shape[1:]))
                new._reserve(shape, self.length + spare, self.dtype, self.device)
                new.length = self.length
                new._views()
                # gathered straight into the new buffers (one copy, of the filled columns only)
                torch.index_select(self.keys, 0, index, out=new.keys)
                torch.index_select(self.values, 0, index, out=new.values)
        return new

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("ReservedLayer is the block sampler's own cache; it does not repeat rows.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("ReservedLayer selects rows with select_rows (a new layer).")


def reserved_cache(capacity: int) -> DynamicCache:
    """A ``DynamicCache`` whose layers (created on first use, one per attention layer) are :class:`ReservedLayer`\\ s of
    ``capacity`` columns."""
    cache = DynamicCache()
    cache.layers = []
    cache.layer_class_to_replicate = lambda: ReservedLayer(capacity)
    return cache


def crop_static(cache: StaticCache, tokens: int) -> None:
    """Forget the last ``tokens`` written to a static cache: the next forward writes over them (the static
    counterpart of ``DynamicCache.crop``; the stale slots are masked out until then)."""
    for layer in cache.layers:
        length = getattr(layer, "cumulative_length", None)
        if not isinstance(length, torch.Tensor):
            raise NotImplementedError(
                f"This transformers version's {type(layer).__name__} keeps no cumulative_length tensor; the static "
                "block cache needs transformers >= 5.0 (use cache_implementation='dynamic')."
            )
        length.sub_(tokens)


def cache_rows(cache: DynamicCache | StaticCache, index: torch.Tensor,
               spare: int | None = None) -> DynamicCache | StaticCache:
    """A new cache of the same kind holding rows ``index`` (of the cache's batch) of every layer; ``cache`` is not
    changed. Full-attention layers only (the sampler refuses other models): each keeps its keys and values, a static
    layer its write position, and a :class:`ReservedLayer` ``spare`` free columns (None: as many as it has)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer):
            out.layers.append(layer.select_rows(index, spare))
            continue
        new = copy.copy(layer)
        if getattr(layer, "is_initialized", False):
            new.keys, new.values = layer.keys[index], layer.values[index]
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                new.cumulative_length = layer.cumulative_length.clone()
            if hasattr(layer, "batch_size"):
                new.batch_size = int(index.numel())
        out.layers.append(new)
    return out
