import pytest
import torch

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, BlockDiffusionSpec, get_spec, left_pad
from tests.helpers import converted

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]


def spec_like(model, **kw):
    return BlockDiffusionSpec(**{**get_spec(model).to_dict(), **kw})


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_block_size_one_reproduces_generate_greedy(word_tokenizer, arch):
    model, tok = converted(word_tokenizer, arch, block_size=1)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model, eos_token_id=[]).generate(ids, am, max_completion_length=12, tau=0.9)
    ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert torch.equal(out.completion_ids, ref[:, ids.shape[1]:])
    assert out.forward_passes == 12
    assert (out.step_map == 0).all()


@pytest.mark.parametrize("block_size,clean_block_causal", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("mode", ["tau", "fixed", "sample"])
def test_cache_equals_no_cache(word_tokenizer, block_size, clean_block_causal, mode):
    model, tok = converted(word_tokenizer, block_size=block_size, clean_block_causal=clean_block_causal)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    kw = {"tau": dict(tau=0.3), "fixed": dict(tokens_per_step=3), "sample": dict(tau=0.5, temperature=1.0, top_k=8)}[mode]
    outs = []
    # the reference (no cache), the dynamic cache, and the static cache the compiled path runs on
    for variant in (dict(use_cache=False), dict(use_cache=True), dict(cache_implementation="static")):
        gen = torch.Generator().manual_seed(0)
        outs.append(BlockDiffusionSampler(model, eos_token_id=[], **variant).generate(
            ids, am, max_completion_length=19, generator=gen, **kw))
    b = outs[0]
    for a in outs[1:]:
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.equal(a.step_map, b.step_map)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert a.forward_passes == b.forward_passes


def test_static_cache_block_size_one_is_ar_greedy_and_compiles(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=1)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    static = BlockDiffusionSampler(model, eos_token_id=[], cache_implementation="static")
    assert torch.equal(static.generate(ids, am, max_completion_length=10).completion_ids, ref[:, ids.shape[1]:])
    # The compiled path (fixed shapes: logits for the whole canvas) traced by dynamo; "eager" skips inductor's C++
    # build so this runs anywhere. On a GPU, compile=True captures CUDA graphs.
    model4, _ = converted(word_tokenizer, block_size=4)
    plain = BlockDiffusionSampler(model4, eos_token_id=[]).generate(ids, am, max_completion_length=10, tau=0.5)
    compiled = BlockDiffusionSampler(model4, eos_token_id=[], cache_implementation="static",
                                     compile=dict(backend="eager", dynamic=False))
    out = compiled.generate(ids, am, max_completion_length=10, tau=0.5)
    assert torch.equal(out.completion_ids, plain.completion_ids) and torch.equal(out.step_map, plain.step_map)
    assert torch.allclose(out.logprobs, plain.logprobs, atol=1e-5)
    # fixed shapes: every compiled forward computes the whole batch, and the row accounting says so
    assert out.computed_row_forwards == out.forward_passes * len(PROMPTS)
    with pytest.raises(ValueError, match="needs cache_implementation='static'"):
        BlockDiffusionSampler(model4, compile=True)
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        BlockDiffusionSampler(model4, cache_implementation="paged")


@pytest.mark.parametrize("mode", ["tau", "fixed"])
def test_batch_decodes_like_each_row_alone(word_tokenizer, mode):
    model, tok = converted(word_tokenizer, block_size=4)
    kw = dict(tau=0.2) if mode == "tau" else dict(tokens_per_step=2)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    sampler = BlockDiffusionSampler(model, eos_token_id=[])
    batch = sampler.generate(ids, am, max_completion_length=14, **kw)
    for r, p in enumerate(PROMPTS):
        alone = sampler.generate(torch.tensor([p]), None, max_completion_length=14, **kw)
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[r])
        assert torch.equal(alone.step_map[0], batch.step_map[r])


def test_sub_blocks_forward_only_the_active_sub_block(word_tokenizer):
    """A block-8 model decoded with ``block_size=4`` (sub-blocks): after the prompt, every forward holds at most the
    4 tokens just committed plus the 4-token active canvas (the full canvas: 8 + 8), sub-blocks commit left to right,
    and the exact cache still equals the no-cache reference."""
    model, tok = converted(word_tokenizer, block_size=8)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        full = BlockDiffusionSampler(model, eos_token_id=[]).generate(ids, am, max_completion_length=16,
                                                                     tokens_per_step=2)
        full_widths, widths[:] = widths[1:], []
        sub = BlockDiffusionSampler(model, eos_token_id=[]).generate(ids, am, max_completion_length=16,
                                                                    tokens_per_step=2, block_size=4)
        sub_widths = widths[1:]
    finally:
        hook.remove()
    assert max(full_widths) == 16 and max(sub_widths) == 8 and min(sub_widths) == 4
    assert sub.forward_passes == full.forward_passes == 8
    for r in range(len(PROMPTS)):  # sub-block j's commits start once sub-block j - 1 is done: step_map restarts at 0
        assert all(sorted(sub.step_map[r, j:j + 4].tolist()) == [0, 0, 1, 1] for j in range(0, 16, 4))
    ref = BlockDiffusionSampler(model, eos_token_id=[], use_cache=False).generate(
        ids, am, max_completion_length=16, tokens_per_step=2, block_size=4)
    assert torch.equal(sub.completion_ids, ref.completion_ids) and torch.equal(sub.step_map, ref.step_map)


def test_never_hangs_and_fixed_schedule_counts(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=8)
    ids, am = left_pad(PROMPTS[:1], tok.pad_token_id)
    sampler = BlockDiffusionSampler(model, eos_token_id=[])
    strict = sampler.generate(ids, am, max_completion_length=16, tau=1.0)  # nothing clears tau=1: one forced commit per step
    assert strict.forward_passes == 16
    assert sorted(strict.step_map[0, :8].tolist()) == list(range(8))
    fixed = sampler.generate(ids, am, max_completion_length=16, tokens_per_step=4)
    assert fixed.forward_passes == 4 and fixed.tokens_per_forward == 4.0
    assert sorted(fixed.step_map[0, :8].tolist()) == [0] * 4 + [1] * 4


def test_stop_token_ends_the_row_and_fills_its_block(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    sampler = BlockDiffusionSampler(model, eos_token_id=[])
    free = sampler.generate(ids, am, max_completion_length=12, tokens_per_step=1)
    stop = int(free.completion_ids[0, 5])  # a token row 0 emits at position 5 (block 1)
    out = sampler.generate(ids, am, max_completion_length=12, tokens_per_step=1, stop_token_ids=[stop])
    row = out.completion_ids[0]
    first = int((row == stop).nonzero()[0])
    assert first <= 5
    assert out.completion_mask[0, : first + 1].all() and not out.completion_mask[0, first + 1 :].any()
    assert (row[first + 1 :] == tok.pad_token_id).all()


def test_bad_arguments(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4)
    sampler = BlockDiffusionSampler(model)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    for tau in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="tau must be in"):
            sampler.generate(ids, am, tau=tau)
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(ids.flip(1), am.flip(1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate(ids, am, max_completion_length=5000)
    with pytest.raises(ValueError, match="tokens_per_step"):
        sampler.generate(ids, am, tokens_per_step=0)


def peaked(tokenizer, block_size: int):
    """A tiny converted model whose output layer is scaled up, so confidences spread over (0, 1) and rows of one
    batch fill their blocks in different numbers of steps (a plain random model commits one token per step in every
    row, which never lets a row leave the forward)."""
    model, tok = converted(tokenizer, block_size=block_size)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model, tok


@pytest.mark.parametrize("stop", [False, True])
def test_rows_leave_the_forward_when_their_block_is_done(word_tokenizer, stop):
    """Rows that filled their block (or stopped) take no part in the block's later forwards, and the batch still
    decodes exactly like each row alone, like the no-cache reference and like the static cache."""
    model, tok = peaked(word_tokenizer, block_size=8)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    kw = dict(max_completion_length=16, tau=0.5)
    sampler = BlockDiffusionSampler(model, eos_token_id=[])
    if stop:  # row 1 stops inside its first block, so it leaves the cache at the second
        kw["stop_token_ids"] = [int(sampler.generate(ids, am, **kw).completion_ids[1, 2])]
    batch = sampler.generate(ids, am, **kw)
    rows = len(PROMPTS)
    assert batch.computed_row_forwards == int(batch.row_forward_passes.sum()) < batch.forward_passes * rows
    for r, p in enumerate(PROMPTS):
        alone = sampler.generate(torch.tensor([p]), None, **kw)
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[r])
        assert torch.equal(alone.step_map[0], batch.step_map[r])
        assert torch.allclose(alone.logprobs[0], batch.logprobs[r], atol=1e-5)
        assert int(batch.row_forward_passes[r]) == alone.forward_passes  # a row's work is its work alone
    if stop:
        assert batch.completion_mask[1].sum() <= 3 and (batch.step_map[1, 8:] == -1).all()
    for variant in (dict(use_cache=False), dict(cache_implementation="static")):
        other = BlockDiffusionSampler(model, eos_token_id=[], **variant).generate(ids, am, **kw)
        assert torch.equal(other.completion_ids, batch.completion_ids)
        assert torch.equal(other.step_map, batch.step_map)
        assert torch.allclose(other.logprobs, batch.logprobs, atol=1e-5)
        assert other.forward_passes == batch.forward_passes
        assert other.computed_row_forwards == batch.computed_row_forwards
    assert batch.row_tokens_per_forward.shape == (rows,)
    assert torch.allclose(batch.row_tokens_per_forward,
                          batch.completion_mask.sum(-1) / batch.row_forward_passes.float())
