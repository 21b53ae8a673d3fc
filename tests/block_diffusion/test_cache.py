"""The sampler's reserved KV cache behaves as transformers' DynamicLayer, without copying the cache per append."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from diffgr2_trl.block_diffusion.cache import ReservedLayer, cache_rows, reserved_cache


def _kv(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, width, 4, generator=g), torch.randn(batch, 2, width, 4, generator=g)


def test_reserved_layer_appends_crops_and_grows_like_a_dynamic_layer():
    reserved, dynamic = ReservedLayer(capacity=6), DynamicLayer()
    # a block sampler's pattern: append committed columns, then a canvas that is cropped off again
    for step, (width, crop) in enumerate([(3, 0), (2, 2), (2, 0), (4, 4), (5, 0), (1, 1)]):  # grows past 6 at step 4
        k, v = _kv(3, width, step)
        out_r, out_d = reserved.update(k, v), dynamic.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(out_r, out_d))
        if crop:
            reserved.crop(-crop)
            dynamic.crop(-crop)
        assert reserved.get_seq_length() == dynamic.get_seq_length()
        assert torch.equal(reserved.keys, dynamic.keys) and torch.equal(reserved.values, dynamic.values)
    assert reserved.get_seq_length() == 10 and reserved._keys.shape[-2] >= 10
    buffer = reserved._keys
    reserved.update(*_kv(3, 1, 9))
    reserved.crop(-1)
    assert reserved._keys is buffer  # an append within the buffer writes in place: no new tensor
    with pytest.raises(ValueError, match="negative"):
        reserved.crop(2)


def test_cache_rows_selects_rows_of_reserved_and_dynamic_layers_alike():
    k, v = _kv(4, 5, 0)
    reserved = reserved_cache(capacity=8)
    reserved.update(k, v, 0)
    index = torch.tensor([3, 1])
    picked = cache_rows(reserved, index, spare=2)
    layer = picked.layers[0]
    assert isinstance(layer, ReservedLayer) and layer._keys.shape[-2] == 7  # 5 filled columns and 2 spare
    assert torch.equal(layer.keys, k[index]) and torch.equal(layer.values, v[index])
    # the source is untouched by writes into the selection
    layer.update(*_kv(2, 2, 1))
    assert reserved.layers[0].get_seq_length() == 5 and torch.equal(reserved.layers[0].keys, k)
    # keeping its capacity: spare=None
    assert cache_rows(reserved, index).layers[0]._keys.shape[-2] == 8
