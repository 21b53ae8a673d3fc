import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from diffgr2_trl.block_diffusion import BlockDecodingConfig, BlockDiffusionSampler
from diffgr2_trl.block_diffusion.attention import cpu_gqa_attention, without_cpu_gqa_attention
from diffgr2_trl.modeling import build_model
from tests.helpers import SMALL_SHAPE, converted


def _count_repeat_kv(monkeypatch):
    calls = []
    original = hf_sdpa.repeat_kv

    def counting(x, n_rep):
        calls.append(n_rep)
        return original(x, n_rep)

    monkeypatch.setattr(hf_sdpa, "repeat_kv", counting)
    return calls


def test_masked_gqa_matches_transformers_without_copying_heads(word_tokenizer, monkeypatch):
    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0).eval()
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # the case that copies
    ids = torch.randint(5, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: transformers then passes a mask to sdpa
    calls = _count_repeat_kv(monkeypatch)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        assert calls, "transformers no longer repeats KV heads under a mask on CPU: the helper may be obsolete"
        calls.clear()
        with cpu_gqa_attention():
            fast = model(input_ids=ids, attention_mask=mask).logits
    assert calls == []
    real = mask.bool()
    torch.testing.assert_close(fast[real], reference[real], rtol=0, atol=1e-5)


def test_sampler_output_unchanged_and_registry_restored(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4, seed=1)
    model.eval()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = torch.randint(5, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    sampler = BlockDiffusionSampler(model, config=BlockDecodingConfig(tau=0.9, max_completion_length=8))
    out = sampler.generate(ids, am)  # runs inside cpu_gqa_attention
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    with without_cpu_gqa_attention():  # the reference: the same forwards through transformers' sdpa
        reference = sampler.generate(ids, am)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    assert torch.equal(out.completion_ids, reference.completion_ids)
    assert torch.equal(out.step_map, reference.step_map)


def test_reentrant_and_restored_on_error():
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_gqa_attention():
            inner = ALL_ATTENTION_FUNCTIONS["sdpa"]
            assert inner is not before and inner.fallback is before
            with cpu_gqa_attention():
                assert ALL_ATTENTION_FUNCTIONS["sdpa"] is inner  # not wrapped twice
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is inner
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_inside_the_reference_context_the_helper_changes_nothing():
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with without_cpu_gqa_attention():
        reference = ALL_ATTENTION_FUNCTIONS["sdpa"]
        with cpu_gqa_attention():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is reference
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_leaves_no_entry_that_would_shadow_a_later_global_registration():
    from transformers import AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with cpu_gqa_attention():
        pass
    try:
        AttentionInterface.register("sdpa", _marker)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is _marker
    finally:
        AttentionInterface.register("sdpa", original)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original


def _marker(*args, **kwargs):  # pragma: no cover - never called
    raise AssertionError

