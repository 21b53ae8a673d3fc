"""A LoRA adapter saved by BlockDiffusionTrainer reloads with stock PEFT and decodes like the in-memory model, also
after merge_and_unload -> save_pretrained -> from_pretrained."""

from __future__ import annotations

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoModelForCausalLM

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, get_spec, left_pad
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer


def _greedy(model, tok):
    prompts = sort_dataset(4, seed=7)["prompt"]
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids for p in prompts], tok.pad_token_id)
    with torch.no_grad():
        return BlockDiffusionSampler(model.eval()).generate(ids, mask, max_completion_length=12, tau=0.9).completion_ids


def test_lora_adapter_round_trip_decodes_like_the_in_memory_model(tmp_path):
    tok = sort_tokenizer()
    build_model("qwen3", tokenizer=tok, shape="tiny", seed=0).save_pretrained(tmp_path / "ar")  # an AR base on disk
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ar")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = BlockDiffusionConfig(str(tmp_path / "run"), use_cpu=True, bf16=False, report_to=[], block_size=4,
                                max_steps=2, per_device_train_batch_size=8, learning_rate=5e-2, save_strategy="no",
                                disable_tqdm=True)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(16), processing_class=tok,
                                    peft_config=lora)  # converted here, in memory
    trainer.train()
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    tok.save_pretrained(adapter)
    want = _greedy(trainer.model, tok)

    reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert get_spec(reloaded) == trainer.spec
    assert torch.equal(_greedy(reloaded, tok), want)

    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert get_spec(again) == trainer.spec
    assert torch.equal(_greedy(again, tok), want)
