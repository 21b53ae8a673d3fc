import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, left_pad
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
from tests.helpers import SMALL_SHAPE, require_bitsandbytes


def decode_accuracy(model, tok, n=48, tau=0.9):
    ev = sort_dataset(n, seed=123)
    ids, am = left_pad([tok(p, add_special_tokens=False).input_ids for p in ev["prompt"]], tok.pad_token_id)
    out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=16, tau=tau)
    texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
    correct = sum(t.split("answer")[-1].split() == want.split() for t, want in zip(texts, ev["target"]))
    return correct / n, out.tokens_per_forward


def test_cft_teaches_parallel_decoding(sort_cft_model_dir):
    """CFT makes the converted model decode the task at tau=0.9 with > 1.5 tokens per forward; the naive
    conversion (same architecture, untrained) does neither."""
    tok = PreTrainedTokenizerFast.from_pretrained(sort_cft_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(sort_cft_model_dir).eval()
    acc, tpf = decode_accuracy(trained, tok)
    assert acc >= 0.9, acc
    assert tpf > 1.5, tpf

    from diffgr2_trl.block_diffusion import convert_to_block_diffusion

    tok2 = sort_tokenizer()
    naive = build_model("qwen3", tokenizer=tok2, shape=SMALL_SHAPE, seed=0)
    convert_to_block_diffusion(naive, tok2, block_size=4)
    acc0, tpf0 = decode_accuracy(naive, tok2)
    assert acc0 < 0.1 and tpf0 < 1.5


def test_cft_logs_segment_losses_and_mask_ratio(sort_cft_model_dir):
    import json
    import os

    # the fixture's trainer state is not kept; re-run two logged steps on the trained weights
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(sort_cft_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sort_cft_model_dir)
    out = os.path.join(sort_cft_model_dir, "relog")
    args = BlockDiffusionConfig(out, use_cpu=True, bf16=False, max_steps=2, logging_steps=1, report_to=[],
                                per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, answer_weight=2.0)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(32), processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and {"loss_reasoning", "loss_answer", "mask_ratio", "masked_token_accuracy"} <= set(logs[0])
    assert 0.0 < logs[0]["mask_ratio"] < 1.0
    assert json.dumps(logs)  # plain numbers


def test_answer_weight_without_segments_is_an_error(sort_cft_model_dir, tmp_path):
    """answer_weight != 1 on rows that say nothing of where the answer starts used to be dropped silently."""
    import pytest

    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(sort_cft_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sort_cft_model_dir)
    rows = sort_dataset(8).remove_columns("answer_start")
    args = BlockDiffusionConfig(str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[], answer_weight=2.0)
    with pytest.raises(ValueError, match=r"answer_weight=2.0 need to know where the answer starts.*'answer_start'"):
        BlockDiffusionTrainer(model, args=args, train_dataset=rows, processing_class=tok)
    args = BlockDiffusionConfig(str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[])
    BlockDiffusionTrainer(model, args=args, train_dataset=rows, processing_class=tok)  # weights 1: nothing to split


def test_cft_reduces_loss_with_grad_accumulation_and_resumes(tmp_path):
    from diffgr2_trl.block_diffusion import convert_to_block_diffusion
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    common = dict(use_cpu=True, bf16=False, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                  learning_rate=3e-3, logging_steps=1, report_to=[], save_steps=10, disable_tqdm=True, seed=0)
    args = BlockDiffusionConfig(str(tmp_path / "run"), max_steps=20, **common)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(400), processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert (tmp_path / "run" / "checkpoint-20").is_dir()
    assert "block_diffusion" in open(tmp_path / "run" / "checkpoint-20" / "config.json").read()
    # resume: continue to step 30 from the saved checkpoint
    args2 = BlockDiffusionConfig(str(tmp_path / "run"), max_steps=30, **common)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-20")
    trainer2 = BlockDiffusionTrainer(model2, args=args2, train_dataset=sort_dataset(400), processing_class=tok)
    trainer2.train(resume_from_checkpoint=True)
    assert trainer2.state.global_step == 30


def test_rows_without_completion_are_rejected(tmp_path):
    import pytest
    from datasets import Dataset

    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE)
    ds = Dataset.from_list([{"prompt": "sort 1 2 : ", "completion": "think 1 2 answer 1 2"},
                            {"prompt": "sort 2 1 : ", "completion": ""}])
    args = BlockDiffusionConfig(str(tmp_path / "cft"), use_cpu=True, bf16=False, report_to=[], block_size=4)
    with pytest.raises(ValueError, match="Row 1 of the train dataset has an empty completion"):
        BlockDiffusionTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="prompt/completion data"):
        BlockDiffusionTrainer(model, args=args, train_dataset=Dataset.from_list([{"text": "a"}]), processing_class=tok)


def test_cft_with_lora_and_qlora(tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from diffgr2_trl.block_diffusion import convert_to_block_diffusion, get_spec
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    base = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0)
    convert_to_block_diffusion(base, tok, block_size=4)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = dict(use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=4, report_to=[],
                save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    trainer = BlockDiffusionTrainer(model, args=BlockDiffusionConfig(str(tmp_path / "lora"), **args),
                                    train_dataset=sort_dataset(32), processing_class=tok, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    assert get_spec(trainer.model).block_size == 4
    require_bitsandbytes()
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_compute_dtype=torch.float32))
    trainer = BlockDiffusionTrainer(q, args=BlockDiffusionConfig(str(tmp_path / "qlora"), **args),
                                    train_dataset=sort_dataset(32), processing_class=tok, peft_config=lora)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in trainer.state.log_history if "train_loss" in h)


def test_answer_segment_starts_at_the_answer_with_a_tokenizer_that_adds_bos(tmp_path):
    """TRL tokenizes rows with the tokenizer's special tokens: with a BOS post-processor (Llama, Mistral) every
    position is one later than in a tokenization without them, which once gave the last reasoning token the answer
    weight."""
    from tokenizers.processors import TemplateProcessing

    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("sort 1").input_ids[0] == tok.bos_token_id
    model = build_model("qwen3", tokenizer=tok, shape="tiny", seed=0)
    args = BlockDiffusionConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], block_size=4, answer_weight=2.0)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(4), processing_class=tok)
    answer_id = tok.convert_tokens_to_ids("answer")
    for row in trainer.train_dataset:
        ids, segs = row["input_ids"], row["segment_ids"]
        assert ids[0] == tok.bos_token_id
        first = segs.index(1)
        assert ids[first] == answer_id, tok.convert_ids_to_tokens(ids[first - 1 : first + 1])
        assert segs[first - 1] == 0 and all(segs[first:])


def test_cft_trains_on_messages_with_the_last_assistant_turn_as_completion(tmp_path):
    """A ``messages`` dataset (what SFTTrainer accepts) trains: the last assistant turn is the completion, earlier
    turns (an earlier assistant turn included) are prompt; a conversation ending on another role is refused."""
    import pytest
    from datasets import Dataset

    from diffgr2_trl.modeling import build_word_tokenizer
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer
    from diffgr2_trl.trainers.cft import messages_to_prompt_completion

    tok = build_word_tokenizer([str(i) for i in range(16)] + ["sort", ":", "think", "answer", "user", "assistant"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                         "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "sort 2 1 :"}, {"role": "assistant", "content": "answer 1 2"},
                          {"role": "user", "content": f"sort {a} {b} :"},
                          {"role": "assistant", "content": f"think {min(a, b)} {max(a, b)} answer {min(a, b)} {max(a, b)}"}]}
            for a, b in [(3, 5), (9, 4), (7, 1), (6, 8)]]
    model = build_model("qwen3", tokenizer=tok, shape="tiny", seed=0)
    args = BlockDiffusionConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], block_size=4,
                                per_device_train_batch_size=4)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    row = trainer.train_dataset[0]
    trained = [i for i, lbl in zip(row["input_ids"], row["labels"]) if lbl != -100]
    assert tok.decode(trained).split() == ["think", "3", "5", "answer", "3", "5", "<eos>"]
    assert tok.decode(row["input_ids"]).split()[:6] == ["user", ":", "sort", "2", "1", ":"]  # earlier turns: prompt
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))

    ends_with_user = [{"messages": rows[0]["messages"] + [{"role": "user", "content": "sort 1 :"}]}]
    with pytest.raises(ValueError, match="Row 0 of the train dataset ends with a 'user' turn after its last assistant"):
        messages_to_prompt_completion(Dataset.from_list(ends_with_user))
