import pytest
import torch

from diffgr2_trl.block_diffusion.masks import allowed, dense_mask, to_model_mask, visible

# Layout: prompt of 2 columns (block -1), completion of 6 columns in blocks of 2: blocks 0,1,2.
N, P, B = 8, 2, 2


def grid(clean_block_causal=True):
    """Training layout [noisy || clean] over N columns: a (2N, 2N) visibility matrix."""
    stream = torch.cat([torch.ones(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)])
    col = torch.arange(N).repeat(2)
    return visible(stream[:, None], col[:, None], stream[None], col[None], comp_start=P, block_size=B,
                   clean_block_causal=clean_block_causal)


def noisy(c):
    return c


def clean(c):
    return N + c


def test_noisy_block_is_bidirectional_and_sees_only_earlier_clean_blocks():
    g = grid()
    # noisy col 4 is block 1 (cols 4,5)
    assert g[noisy(4), noisy(5)] and g[noisy(5), noisy(4)] and g[noisy(4), noisy(4)]
    assert not g[noisy(4), noisy(3)]  # noisy earlier block: invisible
    assert not g[noisy(4), noisy(6)]  # noisy later block: invisible
    assert g[noisy(4), clean(0)] and g[noisy(4), clean(1)] and g[noisy(4), clean(2)] and g[noisy(4), clean(3)]
    assert not g[noisy(4), clean(4)] and not g[noisy(4), clean(5)]  # its own clean block would leak the answer


def test_clean_stream_never_sees_noise_and_is_block_causal():
    g = grid(clean_block_causal=True)
    assert not g[N:, :N].any()
    assert g[clean(4), clean(5)]  # inside a committed block: bidirectional (BD3-LM)
    assert not g[clean(3), clean(4)]
    assert not g[clean(0), clean(1)]  # the prompt stays causal
    g = grid(clean_block_causal=False)
    assert not g[clean(4), clean(5)] and g[clean(5), clean(4)]


def test_multiple_noisy_streams_are_isolated():
    stream = torch.tensor([1, 1, 2, 2, 0, 0])
    col = torch.tensor([2, 3, 2, 3, 0, 1])
    g = visible(stream[:, None], col[:, None], stream[None], col[None], comp_start=2, block_size=2, clean_block_causal=True)
    assert g[0, 1] and not g[0, 2] and not g[0, 3]
    assert g[2, 3] and not g[2, 0]
    assert g[0, 4] and g[2, 5]


def test_dense_mask_hides_padding_and_keeps_diagonal():
    stream = torch.zeros(4, dtype=torch.long)
    col = torch.arange(4)
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    m = dense_mask(stream, col, stream, col, valid, comp_start=4, block_size=1, clean_block_causal=False)
    assert m.shape == (2, 1, 4, 4)
    assert not m[0, 0, 2, 0] and m[1, 0, 2, 0]
    assert m[0, 0, 0, 0]  # a padding query still sees itself: no empty row, no NaN


def test_eager_mask_is_additive():
    m = torch.tensor([[[[True, False]]]])
    f = to_model_mask(m, "eager", torch.float32)
    assert f[0, 0, 0, 0] == 0 and f[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert to_model_mask(m, "sdpa", torch.float32) is m


@pytest.mark.slow
def test_flex_block_mask_matches_dense(word_tokenizer):
    from diffgr2_trl.block_diffusion import (
        align_completions,
        block_diffusion_loss,
        convert_to_block_diffusion,
        get_spec,
    )
    from diffgr2_trl.block_diffusion.noise import sample_noise_mask
    from diffgr2_trl.modeling import build_model

    dense = build_model("qwen3", tokenizer=word_tokenizer)
    import copy

    tok = copy.deepcopy(word_tokenizer)
    convert_to_block_diffusion(dense, tok, block_size=4)
    import importlib.util

    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:  # pragma: no cover - torch < 2.5
        pytest.skip("this torch has no flex attention")
    flex = build_model("qwen3", tokenizer=tok, attn_implementation="flex_attention")  # available: must build
    flex.load_state_dict(dense.state_dict())
    flex.config.block_diffusion = dense.config.block_diffusion
    ids = torch.randint(5, 30, (2, 14))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    cm = torch.zeros_like(ids)
    cm[:, 5:] = 1
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    spec = get_spec(dense)
    masked, _ = sample_noise_mask(batch.completion, batch.comp_start, spec, torch.Generator().manual_seed(0))
    with torch.no_grad():  # flex has no CPU backward
        a, _ = block_diffusion_loss(dense, batch, spec, masked=masked)
        b, _ = block_diffusion_loss(flex, batch, spec, masked=masked)
    assert torch.allclose(a, b, atol=1e-5)


def test_the_old_name_of_the_visibility_rule_still_works():
    assert allowed is visible
