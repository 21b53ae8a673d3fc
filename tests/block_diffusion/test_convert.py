import copy

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, convert_to_block_diffusion, get_spec, left_pad
from diffgr2_trl.modeling import build_model


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_convert_adds_mask_token_and_round_trips(word_tokenizer, arch, tmp_path):
    tok = copy.deepcopy(word_tokenizer)
    model = build_model(arch, tokenizer=tok)
    rows = model.get_input_embeddings().weight.shape[0]
    convert_to_block_diffusion(model, tok, block_size=8)
    spec = get_spec(model)
    assert spec.block_size == 8 and spec.mask_token_id == tok.mask_token_id == rows
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_spec(loaded) == spec
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok2.mask_token_id == spec.mask_token_id
    # the naive conversion loads and decodes
    ids, am = left_pad([[5, 6, 7]], tok.pad_token_id)
    out = BlockDiffusionSampler(loaded).generate(ids, am, max_completion_length=8, tau=0.9)
    assert out.completion_ids.shape[1] <= 8 and out.forward_passes >= 1


def test_spare_embedding_row_is_used_without_resize(word_tokenizer):
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", vocab_size=len(tok) + 8)
    convert_to_block_diffusion(model, tok, block_size=4)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 7  # unchanged
    assert get_spec(model).mask_token_id == len(tok) - 1


def test_mask_token_clashing_with_a_vocabulary_token(word_tokenizer):
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok)
    with pytest.raises(ValueError, match="ordinary token"):
        convert_to_block_diffusion(model, tok, mask_token="sort")
    with pytest.raises(ValueError, match="same as the tokenizer's eos"):
        convert_to_block_diffusion(model, tok, mask_token=tok.eos_token)
    with pytest.raises(ValueError, match="block_size"):
        convert_to_block_diffusion(model, tok, block_size=0)


def test_attention_that_ignores_masks_is_refused(word_tokenizer, monkeypatch):
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        convert_to_block_diffusion(model, tok)
    # an implementation that claims support but ignores the mask is caught by the probe
    model = build_model("qwen3", tokenizer=tok)
    original = model.forward

    def ignoring(*args, attention_mask=None, **kw):
        return original(*args, attention_mask=None, **kw)

    monkeypatch.setattr(model, "forward", ignoring)
    with pytest.raises(ValueError, match="ignored a custom 4-D attention mask"):
        convert_to_block_diffusion(model, tok)


def test_unconverted_model_is_rejected(word_tokenizer):
    with pytest.raises(ValueError, match="not converted"):
        get_spec(build_model("qwen3", tokenizer=word_tokenizer))


def test_sliding_window_models_are_refused_by_conversion_the_trainers_and_the_sampler(word_tokenizer):
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from diffgr2_trl.block_diffusion import BlockDiffusionSampler
    from diffgr2_trl.block_diffusion.convert import check_attention_honours_masks
    from tests.helpers import converted

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    mistral = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", sliding_window=8, **tiny))
    with pytest.raises(ValueError, match="sliding-window attention.*sliding_window=8"):
        convert_to_block_diffusion(mistral, copy.deepcopy(word_tokenizer), block_size=4)
    model, _ = converted(word_tokenizer)  # full attention: accepted
    check_attention_honours_masks(model)
    model.config.sliding_window, model.config.use_sliding_window = 16, True
    check_attention_honours_masks(model)  # layer_types (what the layers read) still say full attention everywhere
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers  # switched on after conversion
    with pytest.raises(ValueError, match="sliding-window"):
        check_attention_honours_masks(model)
    with pytest.raises(ValueError, match="sliding-window"):
        BlockDiffusionSampler(model)
    model.config.sliding_window = None
    with pytest.raises(ValueError, match="sliding_attention layers"):
        check_attention_honours_masks(model)


def test_full_attention_models_with_a_window_field_are_accepted():
    """No false positives: Qwen2 with ``use_sliding_window=True`` whose ``max_window_layers`` covers every layer, and a
    window at least as long as the context (Phi-3.5-mini's 262144 > 131072), attend fully."""
    from transformers import AutoConfig

    from diffgr2_trl.block_diffusion.convert import check_full_attention

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    check_full_attention(AutoConfig.for_model("qwen2", use_sliding_window=True, max_window_layers=2, **tiny))
    with pytest.raises(ValueError, match="sliding_attention layers"):  # layer 1 slides
        check_full_attention(AutoConfig.for_model("qwen2", use_sliding_window=True, max_window_layers=1, **tiny))
    check_full_attention(AutoConfig.for_model("phi3", sliding_window=262144, max_position_embeddings=131072, **tiny))
    check_full_attention(AutoConfig.for_model("mistral", sliding_window=4096, max_position_embeddings=4096, **tiny))
    with pytest.raises(ValueError, match="sliding_window=4096.*max_position_embeddings=8192"):
        check_full_attention(AutoConfig.for_model("mistral", sliding_window=4096, max_position_embeddings=8192,
                                                  **tiny))


def test_an_ignored_router_loss_is_refused(word_tokenizer, tmp_path):
    from diffgr2_trl.block_diffusion.convert import check_attention_honours_masks
    from diffgr2_trl.synthetic import sort_dataset
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer
    from tests.helpers import converted

    model, tok = converted(word_tokenizer)
    model.config.output_router_logits = True  # what an MoE config set to return router logits carries
    with pytest.raises(ValueError, match="output_router_logits=True.*load-balancing loss would be ignored"):
        check_attention_honours_masks(model)
    with pytest.raises(ValueError, match="output_router_logits"):
        BlockDiffusionTrainer(model, args=BlockDiffusionConfig(str(tmp_path), use_cpu=True, bf16=False,
                                                                report_to=[]),
                              train_dataset=sort_dataset(4), processing_class=tok)
