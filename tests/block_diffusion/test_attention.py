import threading

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from diffgr2_trl.block_diffusion import BlockDecodingConfig, BlockDiffusionSampler
from diffgr2_trl.block_diffusion.attention import ATTN_IMPLEMENTATION, cpu_gqa_attention, without_cpu_gqa_attention
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
        with cpu_gqa_attention(model):
            fast = model(input_ids=ids, attention_mask=mask).logits
    assert calls == []
    real = mask.bool()
    torch.testing.assert_close(fast[real], reference[real], rtol=0, atol=1e-5)


def test_sampler_output_unchanged_and_nothing_global_replaced(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4, seed=1)
    model.eval()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = torch.randint(5, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    sampler = BlockDiffusionSampler(model, config=BlockDecodingConfig(tau=0.9, max_completion_length=8))
    out = sampler.generate(ids, am)  # runs inside cpu_gqa_attention(model)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before and model.config._attn_implementation == "sdpa"
    with without_cpu_gqa_attention():  # the reference: the same forwards through transformers' sdpa
        reference = sampler.generate(ids, am)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    assert torch.equal(out.completion_ids, reference.completion_ids)
    assert torch.equal(out.step_map, reference.step_map)


def test_only_the_given_model_switches_and_reentrant_restored_on_error(word_tokenizer):
    """Scoped to one model: another model (same process, same thread) keeps transformers' sdpa inside the block."""
    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0)
    other = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=1)
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_gqa_attention(model):
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            assert other.config._attn_implementation == "sdpa" and ALL_ATTENTION_FUNCTIONS["sdpa"] is before
            with cpu_gqa_attention(model):
                assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION  # the outer block still holds it
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_other_implementations_are_left_alone(word_tokenizer):
    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0, attn_implementation="eager")
    with cpu_gqa_attention(model):
        assert model.config._attn_implementation == "eager"
    with cpu_gqa_attention(object()):  # no HF config: nothing to switch
        pass


def test_inside_the_reference_context_the_helper_changes_nothing(word_tokenizer):
    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0)
    with without_cpu_gqa_attention(), cpu_gqa_attention(model):
        assert model.config._attn_implementation == "sdpa"


def test_threads_sharing_a_model_restore_sdpa_only_after_the_last_leaves(word_tokenizer):
    """Two threads' blocks overlap on one model: the first to leave does not switch the other's forwards back, and
    the model says sdpa once both are out."""
    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with cpu_gqa_attention(model):
            a_inside.set()
            b_inside.wait(10)
        a_left.set()

    def b():
        a_inside.wait(10)
        with cpu_gqa_attention(model):
            b_inside.set()
            a_left.wait(10)
            seen["b_after_a_left"] = model.config._attn_implementation

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"b_after_a_left": ATTN_IMPLEMENTATION}
    assert model.config._attn_implementation == "sdpa"


def test_a_later_global_registration_of_sdpa_is_what_the_fallback_runs(word_tokenizer):
    """transformers' "sdpa" entry is never replaced, and the CPU-GQA path falls back to whatever "sdpa" is now."""
    from transformers import AttentionInterface

    model = build_model("qwen3", tokenizer=word_tokenizer, shape=SMALL_SHAPE, seed=0).eval()
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def marker(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    try:
        AttentionInterface.register("sdpa", marker)
        with torch.no_grad(), cpu_gqa_attention(model):
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is marker
            model(input_ids=torch.tensor([[5, 6, 7]]))  # no mask: the fallback path
    finally:
        AttentionInterface.register("sdpa", original)
    assert calls and ALL_ATTENTION_FUNCTIONS["sdpa"] is original
