"""On-policy distillation: behaviour on the sort task, loss consistency, backends, PEFT/resume, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, convert_to_block_diffusion, get_spec, left_pad
from diffgr2_trl.block_diffusion.likelihood import replay_logits, sample_block_steps
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
from diffgr2_trl.teachers import (
    HFTeacher,
    Teacher,
    TeacherInputError,
    TeacherResponseError,
    TeacherScores,
    TeacherUnavailableError,
    VocabMismatchError,
)
from diffgr2_trl.trainers.opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer
from diffgr2_trl.trainers.opd_loss import divergence, full_vocab_logprobs, topk_tail_logprobs
from tests.helpers import SMALL_SHAPE, WORDS
from tests.trainers.opd_helpers import SortRuleTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0)


def prompts(n: int, seed: int = 0) -> Dataset:
    return sort_dataset(n, seed=seed).select_columns(["prompt", "target"])


@pytest.fixture(scope="module")
def weak_student_dir(tmp_path_factory) -> str:
    """A converted tiny Qwen3 after only 20 CFT steps: decodes the sort task rarely right, room for OPD to improve."""
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weak-student"))
    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    args = BlockDiffusionConfig(path, max_steps=20, per_device_train_batch_size=64, learning_rate=5e-3,
                                lr_scheduler_type="cosine", warmup_steps=5, **{**FAST, "logging_steps": 10})
    BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(1280), processing_class=tok).train()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load(path):
    return AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)


def agreement(model, tok, teacher: SortRuleTeacher, n: int = 64) -> float:
    """Fraction of held-out prompts whose greedy tau=0.9 decode equals the teacher's greedy output."""
    ps = [tok(p, add_special_tokens=False).input_ids for p in sort_dataset(n, seed=123)["prompt"]]
    ids, am = left_pad(ps, tok.pad_token_id)
    out = BlockDiffusionSampler(model.eval()).generate(ids, am, max_completion_length=16, tau=0.9)
    return sum(out.completion_ids[r, : len(teacher.canonical(p))].tolist() == teacher.canonical(p)
               for r, p in enumerate(ps)) / n


def heldout_kl(model, tok, teacher: SortRuleTeacher, n: int = 64) -> float:
    """Mean forward KL(teacher || student) per committed token of the student's own tau=0.9 decodes of held-out prompts:
    each token at the state the sampler committed it in (trajectory replay), against the teacher's full distribution
    at that position, i.e. the OPD objective measured on prompts it never trained on."""
    ps = [tok(p, add_special_tokens=False).input_ids for p in sort_dataset(n, seed=123)["prompt"]]
    ids, am = left_pad(ps, tok.pad_token_id)
    model.eval()
    spec = get_spec(model)
    with torch.no_grad():
        out = BlockDiffusionSampler(model).generate(ids, am, max_completion_length=16, tau=0.9)
        logits = replay_logits(model, ids, am, out.canvas_ids, out.step_map, spec)
    scores = teacher.score([p + out.canvas_ids[r].tolist() for r, p in enumerate(ps)], [len(p) for p in ps],
                           top_k=0, full_vocab=True)
    total, count = 0.0, 0
    for r in range(n):
        keep = out.step_map[r] >= 0
        student, teach = full_vocab_logprobs(logits[r][keep], scores.full_logprobs_of(r)[keep],
                                             exclude_ids=[spec.mask_token_id])
        total += float(divergence(student, teach, beta=0.0).sum())
        count += int(keep.sum())
    return total / count


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_opd_lowers_kl_and_raises_agreement_with_teacher(tmp_path, weak_student_dir):
    model, tok = load(weak_student_dir)
    teacher = SortRuleTeacher()
    before = agreement(copy.deepcopy(model), tok, teacher)
    kl_before = heldout_kl(copy.deepcopy(model), tok, teacher)
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_steps=50, per_device_train_batch_size=8,
                                      learning_rate=3e-3, max_completion_length=16, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(400),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer)
    trainer.train()
    kl = history(trainer, "kl")
    assert sum(kl[-10:]) / 10 < 0.7 * sum(kl[:5]) / 5, kl
    after = agreement(trainer.model, tok, teacher)
    assert after >= before + 0.05, (before, after)
    # forward KL (the default, the paper's objective) moves the student toward the teacher on held-out prompts too
    kl_after = heldout_kl(trainer.model, tok, teacher)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    # every committed token was distilled at the state the sampler saw it in
    assert max(history(trainer, "replay/max_logprob_error")) < 1e-4
    assert history(trainer, "replay/distilled_fraction") == [1.0] * 50
    logs = trainer.state.log_history[0]
    for key in ("rollout/tokens_per_forward", "rollout/validity", "time/rollout", "time/teacher", "time/train",
                "time/teacher_share", "teacher/token_logprob"):
        assert key in logs, key
    assert 0 < logs["time/teacher_share"] < 1 and json.dumps(trainer.state.log_history)


def test_one_state_per_block_with_topk_tail_teacher(tmp_path, weak_student_dir):
    model, tok = load(weak_student_dir)
    teacher = SortRuleTeacher()
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_steps=3, per_device_train_batch_size=4, max_completion_length=16,
                                      replay="one_state_per_block", full_vocab=False, teacher_top_k=5, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(16),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer)
    trainer.train()
    assert all(0 < f < 1 for f in history(trainer, "replay/distilled_fraction"))
    assert max(history(trainer, "replay/max_logprob_error")) < 1e-4
    assert all(math.isfinite(x) and x > 0 for x in history(trainer, "loss"))


def test_sample_block_steps_selects_one_committed_step_per_block():
    step_map = torch.tensor([[0, 0, 1, 2, 0, 1, 1, 1, 0, -1]])
    mask = step_map >= 0
    for seed in range(5):
        steps, selected, weight = sample_block_steps(step_map, 4, mask, generator=torch.Generator().manual_seed(seed))
        assert steps.shape == (1, 3)
        for b, lo in enumerate(range(0, 10, 4)):
            blk = slice(lo, lo + 4)
            assert (step_map[0, blk][selected[0, blk]] == steps[0, b]).all() and selected[0, blk].any()
        assert torch.equal(weight[0, :4][selected[0, :4]], torch.full((int(selected[0, :4].sum()),), 3.0))
    # averaged over draws, the weighted selection counts every committed token once: unbiased
    total = sum(sample_block_steps(step_map, 4, mask, generator=torch.Generator().manual_seed(s))[2]
                for s in range(2000)) / 2000
    assert torch.allclose(total, mask.float(), atol=0.15)


def test_divergences_zero_on_equal_and_topk_tail_bounds_full_kl():
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g) * 2
    t_lp = torch.log_softmax(t_logits, -1)
    for beta in (0.0, 0.5, 1.0):
        same = divergence(*full_vocab_logprobs(t_logits, t_lp), beta)
        assert same.abs().max() < 1e-5
        assert (divergence(*full_vocab_logprobs(s_logits, t_lp), beta) > 0).all()
    full = divergence(*full_vocab_logprobs(s_logits, t_lp))
    top = t_lp.topk(5, -1)
    sparse = divergence(*topk_tail_logprobs(s_logits, top.indices, top.values))
    assert (sparse <= full + 1e-6).all() and (sparse > 0).all()
    # all ids in the top-k: bucketing loses nothing
    top = t_lp.topk(40, -1)
    assert torch.allclose(divergence(*topk_tail_logprobs(s_logits, top.indices, top.values)), full, atol=1e-4)


class SameWeightsTeacher(Teacher):
    """Plain causal forward of the student's own weights, over the teacher vocabulary (mask row dropped)."""

    supports_full_vocab = True

    def __init__(self, model, vocab_size):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    @torch.no_grad()
    def _score(self, sequences, starts, top_k, full_vocab):
        out = TeacherScores([], [], [], [])
        for seq, start in zip(sequences, starts):
            logits = self.model(input_ids=torch.tensor([seq])).logits[0, start - 1 : len(seq) - 1, : self.vocab_size]
            lp = torch.log_softmax(logits.float(), -1)
            out.token_logprobs.append(lp.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0])
            top = lp.topk(top_k, -1)
            out.topk_ids.append(top.indices)
            out.topk_logprobs.append(top.values)
            out.full_logprobs.append(lp)
        return out


@pytest.mark.parametrize("block_size", [1, 4])
def test_kl_is_zero_when_teacher_is_the_student(tmp_path, word_tokenizer, block_size):
    """Block size 1 is exactly AR: a teacher with the student's weights gives KL 0 through the whole loss path
    (rollout, teacher alignment, replay, vocabulary cut). Block size 4 is not AR, so the same check must fail."""
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok, seed=0)
    convert_to_block_diffusion(model, tok, block_size=block_size)
    teacher = SameWeightsTeacher(copy.deepcopy(model).eval(), len(word_tokenizer))
    data = Dataset.from_list([{"prompt": "sort 3 1 2 :"}, {"prompt": "copy 7 7 :"}])
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_steps=1, per_device_train_batch_size=2, learning_rate=0.0,
                                      max_completion_length=8, beta=0.0, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=data,
                                          processing_class=tok, teacher_tokenizer=word_tokenizer)
    trainer.train()
    kl = history(trainer, "kl")[0]
    assert (kl < 1e-5) if block_size == 1 else (kl > 1e-3), kl


@pytest.mark.vllm
def test_opd_with_vllm_server_teacher(tmp_path, vllm_server, word_tokenizer):
    url, model_dir = vllm_server
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=1)
    convert_to_block_diffusion(model, tok, block_size=4)
    data = Dataset.from_list([{"prompt": "sort 3 1 2 :"}, {"prompt": "copy 4 5 :"}])
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), teacher_model=url, teacher_top_k=8, max_steps=2,
                                      per_device_train_batch_size=2, max_completion_length=8, **FAST)
    trainer = OnPolicyDistillationTrainer(model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.full_vocab is False
    assert tok.convert_tokens_to_ids(tok.mask_token) in trainer.teacher.forbidden_token_ids
    assert trainer.teacher.forbidden_token_ids == set(range(len(WORDS) + 4, len(tok)))  # only student-only ids
    trainer.train()
    assert all(math.isfinite(x) and x > 0 for x in history(trainer, "kl"))
    assert max(history(trainer, "replay/max_logprob_error")) < 1e-4


# --- bad input ----------------------------------------------------------------------------------------------------
def tiny_student(word_tokenizer):
    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    return model, tok


def test_unreachable_teacher_url_fails_at_start_up(tmp_path, word_tokenizer):
    model, tok = tiny_student(word_tokenizer)
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), teacher_model="http://127.0.0.1:9",
                                      teacher_kwargs={"retries": 0, "timeout": 2}, **FAST)
    with pytest.raises(TeacherUnavailableError, match="http://127.0.0.1:9"):
        OnPolicyDistillationTrainer(model, args=args, train_dataset=Dataset.from_list([{"prompt": "sort 1 :"}]),
                                    processing_class=tok, teacher_tokenizer=word_tokenizer)


class ShortTeacher(SortRuleTeacher):
    def _score(self, sequences, starts, top_k, full_vocab):
        out = super()._score(sequences, starts, top_k, full_vocab)
        out.token_logprobs[0] = out.token_logprobs[0][:-1]
        return out


def test_teacher_returning_fewer_positions_is_an_error(tmp_path, weak_student_dir):
    model, tok = load(weak_student_dir)
    teacher = ShortTeacher()
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_steps=1, per_device_train_batch_size=2, max_completion_length=8, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(4),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer)
    with pytest.raises(TeacherResponseError, match="completion positions for sequence 0"):
        trainer.train()


def test_tokenizer_mismatch_and_bad_config(tmp_path, weak_student_dir, word_tokenizer):
    model, tok = load(weak_student_dir)
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), **FAST)
    with pytest.raises(VocabMismatchError, match="incompatible"):
        OnPolicyDistillationTrainer(model, teacher=SortRuleTeacher(), args=args, train_dataset=prompts(4),
                                    processing_class=tok, teacher_tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="num_generations must be a positive integer"):
        OnPolicyDistillationConfig(str(tmp_path / "opd"), num_generations=0, **FAST)
    with pytest.raises(ValueError, match="replay must be one of"):
        OnPolicyDistillationConfig(str(tmp_path / "opd"), replay="some", **FAST)
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        OnPolicyDistillationTrainer(model, teacher=SortRuleTeacher(), args=args, processing_class=tok,
                                    train_dataset=Dataset.from_list([{"text": "sort 1 2 :"}]))


def test_student_attention_that_ignores_masks_is_refused(weak_student_dir, tmp_path):
    """OPD checks, as CFT and GRPO do, that the student's attention applies the block masks (it used to decode
    and train under whatever mask the implementation applied)."""
    model, tok = load(weak_student_dir)
    model.config._attn_implementation = "flash_attention_2"
    args = OnPolicyDistillationConfig(str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        OnPolicyDistillationTrainer(model, teacher=SortRuleTeacher(), args=args, train_dataset=prompts(4),
                                    processing_class=tok, teacher_tokenizer=SortRuleTeacher().tokenizer)


def test_prompt_longer_than_teacher_context(tmp_path, weak_student_dir):
    model, tok = load(weak_student_dir)
    teacher = SortRuleTeacher()
    teacher.max_length = 20
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_completion_length=16, **FAST)
    with pytest.raises(ValueError, match="more than the teacher's context of 20"):
        OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(4), processing_class=tok,
                                    teacher_tokenizer=teacher.tokenizer)
    # left truncation makes it fit; the teacher still refuses anything longer at scoring time
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_completion_length=16, max_prompt_length=4, **FAST)
    OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(4), processing_class=tok,
                                teacher_tokenizer=teacher.tokenizer)
    with pytest.raises(TeacherInputError, match="longer than the teacher's context"):
        teacher.score([list(range(5)) * 5], [3])


def test_lora_grad_accumulation_checkpoint_and_resume(weak_student_dir, tmp_path):
    from peft import LoraConfig

    model, tok = load(weak_student_dir)
    teacher = SortRuleTeacher()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, max_completion_length=16,
                  **{**FAST, "save_strategy": "steps"}, save_steps=2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = OnPolicyDistillationConfig(str(tmp_path / "run"), max_steps=2, **common)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(32),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer, peft_config=lora)
    trainer.train()
    merged = trainer.model.get_base_model().state_dict()
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.base_layer.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in merged.items())
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").exists()
    card = (tmp_path / "run" / "README.md").read_text()  # TRL's model card, with this trainer's tags and paper
    assert "on-policy-distillation" in card and "2607.01170" in card
    model2, _ = load(weak_student_dir)
    args2 = OnPolicyDistillationConfig(str(tmp_path / "run"), max_steps=3, **common)
    trainer2 = OnPolicyDistillationTrainer(model2, teacher=teacher, args=args2, train_dataset=prompts(32),
                                           processing_class=tok, teacher_tokenizer=teacher.tokenizer, peft_config=lora)
    trainer2.train(resume_from_checkpoint=True)
    assert trainer2.state.global_step == 3


def test_cli_opd_with_hf_teacher_path(weak_student_dir, tmp_path):
    from diffgr2_trl.cli import main

    teacher_dir, out = str(tmp_path / "teacher"), str(tmp_path / "out")
    tok = sort_tokenizer()
    build_model("qwen3", tokenizer=tok, seed=0).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    prompts(6).to_json(str(tmp_path / "prompts.jsonl"))
    rc = main(["opd", "--model_name_or_path", weak_student_dir, "--teacher", teacher_dir, "--dataset_name", str(tmp_path / "prompts.jsonl"),
               "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_completion_length", "8",
               "--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no"])
    assert rc == 0
    assert "block_diffusion" in open(f"{out}/config.json").read()


def test_divergence_is_finite_when_a_shared_mask_id_has_teacher_mass():
    """A reserved mask token both tokenizers hold: the student's replay gives it -inf, the teacher tiny mass."""
    from diffgr2_trl.trainers.opd_loss import divergence, full_vocab_logprobs, topk_tail_logprobs

    torch.manual_seed(0)
    student = torch.randn(2, 3, 10)
    student[..., 4] = float("-inf")
    teacher = torch.log_softmax(torch.randn(2, 3, 10), -1)
    s, t = full_vocab_logprobs(student, teacher, exclude_ids=[4])
    assert s.shape[-1] == 9 and torch.isfinite(divergence(s, t, 0.0)).all()
    ids = teacher.topk(5, -1).indices
    ids[..., 0] = 4
    s, t = topk_tail_logprobs(student, ids, teacher.gather(-1, ids))
    assert torch.isfinite(divergence(s, t, 0.0)).all()


def test_opd_with_qlora(tmp_path):
    """LoRA on a 4-bit nf4 student (bitsandbytes, CPU): two steps train the adapter, the replay stays exact."""
    from peft import LoraConfig

    from diffgr2_trl.block_diffusion import get_spec
    from tests.helpers import is_4bit, quantized_sort_student

    model, tok = quantized_sort_student(tmp_path / "base")
    teacher = SortRuleTeacher()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = OnPolicyDistillationConfig(str(tmp_path / "qlora"), max_steps=2, per_device_train_batch_size=2,
                                      max_completion_length=8, learning_rate=1e-2, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(8),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer, peft_config=lora)
    assert is_4bit(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    assert get_spec(trainer.model).block_size == 4
    assert all(math.isfinite(x) and x > 0 for x in history(trainer, "kl"))
    assert max(history(trainer, "replay/max_logprob_error")) < 1e-4


class CountingSampler(BlockDiffusionSampler):
    """The block sampler, counting the calls and the models it was handed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.models = 0, []

    def generate(self, input_ids, attention_mask=None, *, model=None, **kw):
        self.calls += 1
        self.models.append(model)
        return super().generate(input_ids, attention_mask, model=model, **kw)


def test_custom_sampler_is_the_one_used_and_config_fields(tmp_path, weak_student_dir):
    from diffgr2_trl.block_diffusion import BlockDecodingConfig

    model, tok = load(weak_student_dir)
    teacher = SortRuleTeacher()
    sampler = CountingSampler(config=BlockDecodingConfig(max_completion_length=8, tau=0.5, temperature=1.0),
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_steps=2, per_device_train_batch_size=2, **FAST)
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(8),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer, sampler=sampler)
    assert trainer.sampler is sampler
    trainer.train()
    assert sampler.calls == 2 and all(m is trainer.model for m in sampler.models)
    assert max(history(trainer, "replay/max_logprob_error")) < 1e-4
    # the default sampler decodes with the config's decoding fields
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_completion_length=12, tau=0.7, top_k=5, **FAST)
    default = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts(4),
                                          processing_class=tok, teacher_tokenizer=teacher.tokenizer).sampler
    assert default.config == BlockDecodingConfig(max_completion_length=12, tau=0.7, temperature=1.0, top_k=5)
    # TRL's name for the length; the old one still works, with a deprecation warning
    with pytest.warns(FutureWarning, match="max_new_tokens is deprecated"):
        old = OnPolicyDistillationConfig(str(tmp_path / "opd"), max_new_tokens=16, **FAST)
    assert old.max_completion_length == 16
    with pytest.raises(ValueError, match="tau must be in"):
        OnPolicyDistillationConfig(str(tmp_path / "opd"), tau=0.0, **FAST)
    with pytest.raises(ValueError, match="temperature and top_k only"):
        OnPolicyDistillationConfig(str(tmp_path / "opd"), top_p=0.5, **FAST)


def test_opd_and_grpo_tokenize_prompts_through_one_function(tmp_path, word_tokenizer):
    """With a tokenizer that adds BOS, OPD's rollout prompts equal GRPO's (and TRL SFT's, hence CFT's): one
    tokenization, TRL's, for every trainer. OPD used to drop the special tokens."""
    from tokenizers.processors import TemplateProcessing

    from diffgr2_trl.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer

    tok = copy.deepcopy(word_tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    model = build_model("qwen3", tokenizer=tok, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    texts = ["sort 3 1 2 :", "copy 7 7 :"]
    data = Dataset.from_list([{"prompt": t} for t in texts])
    opd = OnPolicyDistillationTrainer(
        model, teacher=SameWeightsTeacher(copy.deepcopy(model).eval(), len(tok)), processing_class=tok,
        args=OnPolicyDistillationConfig(str(tmp_path / "opd"), max_completion_length=8, **FAST), train_dataset=data,
        teacher_tokenizer=tok)
    grpo = DiffusionGRPOTrainer(model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                processing_class=tok, train_dataset=data,
                                args=DiffusionGRPOConfig(str(tmp_path / "grpo"), num_generations=2,
                                                         per_device_train_batch_size=2, **FAST))
    got = opd._prompt_ids(texts)
    assert got == [list(x) for x in grpo._tokenize_prompts(texts)[0]]
    assert all(ids[0] == tok.bos_token_id for ids in got)
    opd.args.max_prompt_length = 3  # left truncation keeps the prompt's end
    assert opd._prompt_ids(texts) == [ids[-3:] for ids in got]


@pytest.mark.parametrize("full_vocab", [True, False])
def test_chunked_loss_equals_the_unchunked_one_with_gradients(tmp_path, word_tokenizer, full_vocab):
    """The loss computed a few positions at a time (output layer and divergence rebuilt in backward, the local
    teacher's log-probs built per chunk from its hidden states) equals, in value and gradient, the loss over the
    whole (rows, T, V) logits and the dense teacher log-probs."""
    from diffgr2_trl.block_diffusion.likelihood import replay_logits

    tok = copy.deepcopy(word_tokenizer)
    model = build_model("qwen3", tokenizer=tok, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    teacher = HFTeacher(build_model("qwen3", tokenizer=word_tokenizer, seed=1))
    args = OnPolicyDistillationConfig(str(tmp_path / "opd"), per_device_train_batch_size=2, max_completion_length=10,
                                      beta=0.3, tau=0.3, full_vocab=full_vocab, **FAST)
    data = Dataset.from_list([{"prompt": "sort 3 1 2 :"}, {"prompt": "copy 7 7 :"}])
    trainer = OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=data,
                                          processing_class=tok, teacher_tokenizer=word_tokenizer)
    inputs = trainer._generate_and_score_completions([{"prompt": "sort 3 1 2 :"}, {"prompt": "copy 7 7 :"}])
    assert ("teacher_full_hidden" in inputs) == full_vocab  # the local teacher's lazy form, never (rows, T, V)

    def loss_and_grads(chunk_size):
        model.zero_grad()
        trainer.args.loss_chunk_size = chunk_size
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # reference: the whole (rows, T, V) logits and teacher log-probs at once, no checkpointing
    model.zero_grad()
    logits = replay_logits(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["canvas_ids"],
                           inputs["step_map"], trainer.spec)
    if full_vocab:
        s_lp, t_lp = full_vocab_logprobs(logits, trainer._teacher_head(inputs["teacher_full_hidden"]),
                                         exclude_ids=trainer.student_only_ids)
    else:
        s_lp, t_lp = topk_tail_logprobs(logits, inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"])
    per_seq = (divergence(s_lp, t_lp, 0.3) * inputs["weight"]).sum(-1) / inputs["completion_mask"].sum(-1).clamp_min(1)
    ref = per_seq.sum() / inputs["num_sequences"]
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    rows, width = inputs["canvas_ids"].shape
    assert width >= 8  # several chunks below
    for chunk_size in (rows * width, 3 * rows, 1):  # one chunk; ragged chunks of 3 columns; one column at a time
        loss, grads = loss_and_grads(chunk_size)
        torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=0)
        assert grads.keys() == ref_grads.keys() and grads
        for name, g in grads.items():  # float32 sums in another order: 1e-6 of the gradient's scale
            scale = ref_grads[name].abs().max().clamp_min(1.0).item()
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6 * scale, rtol=0, msg=name)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        OnPolicyDistillationConfig(str(tmp_path / "x"), loss_chunk_size=0, **FAST)
