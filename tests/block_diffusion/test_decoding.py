import pytest
import torch

from diffgr2_trl.block_diffusion import BlockDecodingConfig, BlockDiffusionSampler, left_pad
from tests.helpers import converted

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]


def test_max_new_tokens_still_works_and_warns_at_the_callers_line(word_tokenizer):
    model, tok = converted(word_tokenizer, block_size=4)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    sampler = BlockDiffusionSampler(model, eos_token_id=[])
    with pytest.warns(FutureWarning, match="max_completion_length") as caught:
        old = sampler.generate(ids, am, max_new_tokens=7, tau=0.5)
    assert [w.filename for w in caught] == [__file__]  # stacklevel names this line, not the sampler's internals
    new = sampler.generate(ids, am, max_completion_length=7, tau=0.5)
    assert old.completion_ids.shape[1] == 7
    assert torch.equal(old.completion_ids, new.completion_ids) and torch.equal(old.step_map, new.step_map)
    with pytest.warns(FutureWarning) as caught:
        assert BlockDecodingConfig().replace(max_new_tokens=9).max_completion_length == 9
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("field,value", [("tau", 0.0), ("tokens_per_step", 0), ("temperature", -0.5), ("block_size", 0),
                                         ("max_completion_length", 0), ("top_k", -1)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        BlockDecodingConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        BlockDecodingConfig().replace(**{field: value})
    with pytest.raises(TypeError, match="Unknown decoding option"):
        BlockDecodingConfig().replace(taux=0.5)


@pytest.mark.parametrize("clean_block_causal", [True, False])
def test_block_size_one_at_decode_time_is_ar_greedy(word_tokenizer, clean_block_causal):
    """By construction: with token shift and one-token blocks every forward is clean-stream only (no canvas), under
    the causal mask, so each token is the argmax of the AR next-token logits whatever block size the model was
    converted with."""
    model, tok = converted(word_tokenizer, block_size=4, clean_block_causal=clean_block_causal)
    ids, am = left_pad(PROMPTS, tok.pad_token_id)
    out = BlockDiffusionSampler(model, eos_token_id=[]).generate(ids, am, max_completion_length=10, block_size=1)
    ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert torch.equal(out.completion_ids, ref[:, ids.shape[1]:])
    assert out.forward_passes == 10 and (out.step_map == 0).all()
