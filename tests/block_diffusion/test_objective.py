import pytest
import torch
import torch.nn.functional as F

from diffgr2_trl.block_diffusion import BlockDiffusionSpec, align_completions, block_diffusion_loss, get_spec
from diffgr2_trl.block_diffusion.layout import source_index
from diffgr2_trl.block_diffusion.objective import multi_stream_logits
from tests.helpers import converted, random_batch


def ar_token_ce(model, ids, am, cm):
    """Per-row AR next-token CE of completion tokens, concatenated (row-major)."""
    out = []
    for r in range(ids.shape[0]):
        real = am[r].bool()
        x = ids[r][real][None]
        c = cm[r][real].bool()
        logits = model(input_ids=x).logits[0, :-1]
        ce = F.cross_entropy(logits, x[0, 1:], reduction="none")
        out.append(ce[c[1:]])
    return out


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_block_size_one_with_shift_is_ar_cross_entropy(word_tokenizer, arch):
    model, _ = converted(word_tokenizer, arch, block_size=1)
    spec = BlockDiffusionSpec(block_size=1, mask_token_id=get_spec(model).mask_token_id, min_mask_ratio=1.0)
    ids, am, cm = random_batch(3, 12, 5)
    am[1, 10:] = 0  # right padding, as TRL's collator gives it
    cm[2, 3:5] = 1  # rows with different prompt lengths
    batch = align_completions(ids, am, cm, block_size=1, pad_token_id=0)
    loss, metrics = block_diffusion_loss(model, batch, spec)
    expected = torch.cat(ar_token_ce(model, ids, am, cm)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert metrics["masked_total"] == int((cm * am).sum())


def test_random_masks_score_exactly_the_masked_tokens_at_block_size_one(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=1)
    spec = get_spec(model)
    ids, am, cm = random_batch(2, 10, 4)
    batch = align_completions(ids, am, cm, block_size=1, pad_token_id=0)
    masked = torch.zeros_like(batch.completion)
    masked[0, batch.comp_start + 1] = masked[1, batch.comp_start + 3] = masked[1, batch.comp_start + 5] = True
    loss, _ = block_diffusion_loss(model, batch, spec, masked=masked)
    ce = ar_token_ce(model, ids, am, cm)
    expected = torch.stack([ce[0][1], ce[1][3], ce[1][5]]).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def per_token_ce(model, batch, spec, masked):
    n = batch.input_ids.shape[1]
    noisy = torch.where(masked, torch.full_like(batch.input_ids, spec.mask_token_id), batch.input_ids)
    noisy = noisy[:, batch.comp_start:]
    keep = source_index(torch.arange(batch.comp_start, n), batch.comp_start, spec, noisy_offset=n)
    logits = multi_stream_logits(model, batch.input_ids, [noisy], batch.valid, batch.position_ids, batch.comp_start, spec, keep)
    return F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, batch.comp_start:], reduction="none")


def test_segment_weights_and_inverse_t_against_hand_computation(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=4)
    spec = get_spec(model)
    ids, am, cm = random_batch(2, 13, 5)
    seg = torch.zeros_like(ids)
    seg[:, 10:] = 1  # last tokens are the "answer"
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0, segment_ids=seg)
    g = torch.Generator().manual_seed(1)
    masked = torch.rand(batch.completion.shape, generator=g) < 0.5
    masked &= batch.completion
    ce = per_token_ce(model, batch, spec, masked)
    m = masked[:, batch.comp_start:].float()
    w = torch.tensor([0.3, 2.0])[batch.segment_ids[:, batch.comp_start:]]
    expected = (ce * w * m).sum() / (w * m).sum()
    loss, metrics = block_diffusion_loss(model, batch, spec, masked=masked, segment_weights=(0.3, 2.0))
    assert torch.allclose(loss, expected, atol=1e-5)
    s = batch.segment_ids[:, batch.comp_start:]
    assert torch.allclose(metrics["ce_sum/seg1"], (ce * m * (s == 1)).sum(), atol=1e-4)
    # "completion" normalisation divides by every completion token, masked or not
    loss_c, _ = block_diffusion_loss(model, batch, spec, masked=masked, loss_normalization="completion")
    assert torch.allclose(loss_c, (ce * m).sum() / batch.completion.sum(), atol=1e-5)


def test_inverse_t_weighting_uses_the_drawn_ratio(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=4)
    spec = get_spec(model)
    spec.min_mask_ratio = spec.max_mask_ratio = 0.5
    spec.inverse_t_weighting = True
    ids, am, cm = random_batch(2, 13, 5)
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    torch.manual_seed(3)
    loss, metrics = block_diffusion_loss(model, batch, spec, loss_normalization="completion", generator=torch.Generator().manual_seed(5))
    from diffgr2_trl.block_diffusion.noise import sample_noise_mask

    masked, ratio = sample_noise_mask(batch.completion, batch.comp_start, spec, torch.Generator().manual_seed(5))
    ce = per_token_ce(model, batch, spec, masked)
    m = masked[:, batch.comp_start:].float()
    expected = (ce * m / 0.5).sum() / batch.completion.sum()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_complementary_masks_cover_every_completion_token_once(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=4, complementary_masks=True)
    spec = get_spec(model)
    ids, am, cm = random_batch(2, 13, 5)
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    _, metrics = block_diffusion_loss(model, batch, spec)
    assert metrics["masked_total"] == batch.completion.sum()


def test_a_later_block_never_changes_an_earlier_blocks_logits(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=4)
    spec = get_spec(model)
    ids, am, cm = random_batch(1, 17, 5)
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    masked = batch.completion.clone()
    masked[0, batch.comp_start + 8 :: 2] = False  # block 2's canvas shows some of its own (changed) tokens
    n = batch.input_ids.shape[1]
    keep = source_index(torch.arange(batch.comp_start, n), batch.comp_start, spec, noisy_offset=n)

    def logits(clean):
        noisy = torch.where(masked, torch.full_like(clean, spec.mask_token_id), clean)[:, batch.comp_start:]
        return multi_stream_logits(model, clean, [noisy], batch.valid, batch.position_ids, batch.comp_start, spec, keep)

    a = logits(batch.input_ids)
    changed = batch.input_ids.clone()
    changed[0, batch.comp_start + 8:] = 7  # rewrite block 2 and later
    b = logits(changed)
    # predictions of blocks 0, 1 and the first token of block 2 (predicted from block 1's clean stream)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_eos_fills_the_last_block(word_tokenizer):
    eos = word_tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, eos]])
    cm = torch.tensor([[0, 0, 1, 1, 1, 1]])
    batch = align_completions(ids, torch.ones_like(ids), cm, block_size=3, pad_token_id=0, eos_token_id=eos)
    assert batch.input_ids[0, 2:].tolist() == [7, 8, 9, eos, eos, eos]
    assert batch.completion[0, 2:].all()


def test_bad_inputs_raise_clear_errors(word_tokenizer):
    model, _ = converted(word_tokenizer, block_size=4)
    ids, am, cm = random_batch(2, 8, 4)
    cm[1] = 0
    with pytest.raises(ValueError, match="Row 1 of the batch has no completion"):
        align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    ids, am, cm = random_batch(1, 8, 4)
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    batch.position_ids = batch.position_ids + 5000
    with pytest.raises(ValueError, match="max_position_embeddings"):
        block_diffusion_loss(model, batch, get_spec(model))
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionSpec(block_size=0)


def test_wrapped_models_give_the_same_loss_and_replay(word_tokenizer):
    """The core calls a wrapped model (DataParallel here; DDP, DeepSpeed and torch.compile alike) and reads
    ``config``/``dtype``/the LM head from the model inside: same loss, same replay log-probs, same spec."""
    from diffgr2_trl.block_diffusion import BlockDiffusionSampler, left_pad, unwrap_model
    from diffgr2_trl.block_diffusion.likelihood import replay_logprobs

    model, tok = converted(word_tokenizer, block_size=4)
    wrapped = torch.nn.DataParallel(torch.compile(model))  # DataParallel without GPUs just calls the module
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    assert not hasattr(wrapped, "config")  # what made the core fail under DDP
    assert get_spec(wrapped) == get_spec(model)
    spec = BlockDiffusionSpec.from_dict({**get_spec(model).to_dict(), "min_mask_ratio": 1.0})
    ids, am, cm = random_batch(2, 12, 5)
    batch = align_completions(ids, am, cm, block_size=4, pad_token_id=0)
    plain, _ = block_diffusion_loss(torch.nn.DataParallel(model), batch, spec)  # eager: compile is slow on CPU
    torch.testing.assert_close(plain, block_diffusion_loss(model, batch, spec)[0])
    prompt, mask = left_pad([tok("sort 3 1 2 :", add_special_tokens=False).input_ids], tok.pad_token_id)
    out = BlockDiffusionSampler(torch.nn.DataParallel(model)).generate(prompt, mask, max_completion_length=8, tau=0.9)
    for m in (model, torch.nn.DataParallel(model)):
        lp = replay_logprobs(m, prompt, mask, out.canvas_ids, out.step_map, get_spec(m)).logps
        torch.testing.assert_close(lp[out.completion_mask], out.logprobs[out.completion_mask], atol=1e-5, rtol=0)
