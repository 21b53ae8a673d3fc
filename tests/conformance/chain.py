"""The end-to-end chain every conformance test runs: convert -> one CFT step -> sampler -> replay -> one OPD step ->
one GRPO step, through the public API only, in float32 or under bf16 autocast on CPU.

Samplers passed to the trainers (their documented ``sampler=`` hook) record each rollout, check it against an eval-mode
trajectory replay at the rollout's weights, or hand back a recorded rollout, so that a bf16 step can be compared with
the float32 step on the very same trajectories (otherwise a bf16 rounding that flips one sampled token would change
the whole loss).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from diffgr2_trl import (
    BlockDecodingConfig,
    BlockDiffusionConfig,
    BlockDiffusionSampler,
    BlockDiffusionTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    OnPolicyDistillationConfig,
    OnPolicyDistillationTrainer,
    convert_to_block_diffusion,
    get_spec,
    left_pad,
    replay_logprobs,
)
from diffgr2_trl.synthetic import sort_dataset
from diffgr2_trl.teachers import HFTeacher

from .models import build_family

BLOCK_SIZE = 4
COMPLETION_LENGTH = 8  # two blocks
PRECISIONS = ("float32", "bf16")


@dataclass
class Family:
    """One model family, built and converted once per session; every chain works on copies."""

    name: str
    ar_model: torch.nn.Module  # the AR model before conversion (the OPD teacher)
    ar_tokenizer: object
    model: torch.nn.Module  # converted, never trained
    tokenizer: object  # converted (holds the mask token)


def load_family(name: str) -> Family:
    ar, tok = build_family(name)
    teacher_tok = copy.deepcopy(tok)
    model, tok = convert_to_block_diffusion(copy.deepcopy(ar), tok, block_size=BLOCK_SIZE)
    return Family(name, ar, teacher_tok, model, tok)


def autocast(precision: str):
    """bf16 autocast on CPU (weights stay float32), as ``bf16=True`` makes the trainers do; float32: no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_args(precision: str) -> dict:
    return dict(use_cpu=True, bf16=precision == "bf16", max_steps=1, per_device_train_batch_size=4, report_to=[],
                save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1)


def prompts(n: int = 4) -> Dataset:
    return sort_dataset(n, seed=1).select_columns(["prompt"])


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A stock-TRL reward with variance on a random model: completion length in characters."""
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def step_log(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1, trainer.state.log_history
    return logs[0]


class RecordingSampler:
    """The real sampler, recording every rollout; ``check_replay`` also replays each rollout in eval mode at the
    rollout's weights and records the largest difference from the sampler's own log-probs (inside completion_mask)."""

    def __init__(self, inner: BlockDiffusionSampler, check_replay: bool = False):
        self.inner, self.check_replay = inner, check_replay
        self.rollouts: list[tuple[torch.Tensor, object]] = []
        self.replay_errors: list[float] = []
        self.training_flags: list[bool] = []

    def generate(self, input_ids, attention_mask=None, *, model=None, **kwargs):
        model = model if model is not None else self.inner.model
        self.training_flags.append(model.training)
        out = self.inner.generate(input_ids, attention_mask, model=model, **kwargs)
        self.rollouts.append((input_ids.clone(), out))
        if self.check_replay:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    spec = get_spec(model.get_base_model() if hasattr(model, "get_base_model") else model)
                    lp = replay_logprobs(model, input_ids, attention_mask, out.canvas_ids, out.step_map, spec,
                                         temperature=self.inner.config.temperature or 1.0).logps
            finally:
                model.train(was_training)
            keep = out.completion_mask
            self.replay_errors.append((lp[keep] - out.logprobs[keep]).abs().max().item())
        return out


class ReplayingSampler:
    """Hands back recorded rollouts in order (the trainer must ask for the same prompts)."""

    def __init__(self, rollouts):
        self.rollouts = list(rollouts)

    def generate(self, input_ids, attention_mask=None, *, model=None, **kwargs):
        ids, out = self.rollouts.pop(0)
        assert torch.equal(ids, input_ids), "the trainer asked for other prompts than the recorded run"
        return out


def decoding(temperature: float = 1.0) -> BlockDecodingConfig:
    return BlockDecodingConfig(max_completion_length=COMPLETION_LENGTH, tau=0.9, temperature=temperature)


@dataclass
class ChainResult:
    cft: dict
    sampler_replay_error: float  # max |replay - sampler| inside completion_mask, same precision
    sampler_vs_float32_replay: float  # the same trajectory replayed in float32
    completion_tokens: int
    opd: dict
    grpo: dict
    rollouts: dict = field(default_factory=dict)  # trainer name -> recorded rollouts (float32 runs)


def run_chain(fam: Family, precision: str, out_dir, rollouts: dict | None = None) -> ChainResult:
    """One CFT step, one sampler call + replay, one OPD step and one GRPO step on a copy of ``fam.model``.

    With ``rollouts`` (from a float32 chain) OPD and GRPO train on those trajectories instead of sampling.
    """
    torch.manual_seed(0)
    model, tok = copy.deepcopy(fam.model), fam.tokenizer
    spec = get_spec(model)

    # 1. one CFT step, answer segment weighted
    cft = BlockDiffusionTrainer(
        model, args=BlockDiffusionConfig(str(out_dir / "cft"), answer_weight=2.0, **train_args(precision)),
        train_dataset=sort_dataset(4, seed=0), processing_class=tok)
    cft.train()
    model = cft.model.eval()

    # 2. the sampler, then trajectory replay of what it sampled
    ids, mask = left_pad([tok(p).input_ids for p in prompts()["prompt"]], tok.pad_token_id)
    sampler = BlockDiffusionSampler(model, config=decoding(), pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
    with autocast(precision):
        out = sampler.generate(ids, mask, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = replay_logprobs(model, ids, mask, out.canvas_ids, out.step_map, spec).logps
    with torch.no_grad():
        lp32 = replay_logprobs(model, ids, mask, out.canvas_ids, out.step_map, spec).logps
    keep = out.completion_mask

    # 3. one OPD step, the unconverted AR model as in-process teacher (full-vocabulary KL)
    recorded = {}
    opd_sampler = (ReplayingSampler(rollouts["opd"]) if rollouts else
                   RecordingSampler(BlockDiffusionSampler(spec=spec, config=decoding(), pad_token_id=tok.pad_token_id,
                                                          eos_token_id=tok.eos_token_id)))
    opd = OnPolicyDistillationTrainer(
        model, teacher=HFTeacher(copy.deepcopy(fam.ar_model)), teacher_tokenizer=fam.ar_tokenizer,
        args=OnPolicyDistillationConfig(str(out_dir / "opd"), num_generations=2, max_completion_length=COMPLETION_LENGTH,
                                        temperature=1.0, **train_args(precision)),
        train_dataset=prompts(), processing_class=tok, sampler=opd_sampler)
    opd.train()
    if not rollouts:
        recorded["opd"] = opd_sampler.rollouts

    # 4. one GRPO step
    grpo_sampler = (ReplayingSampler(rollouts["grpo"]) if rollouts else
                    RecordingSampler(BlockDiffusionSampler(spec=spec, config=decoding(), pad_token_id=tok.pad_token_id,
                                                           eos_token_id=tok.eos_token_id)))
    grpo = DiffusionGRPOTrainer(
        opd.model, reward_funcs=length_reward, processing_class=tok, train_dataset=prompts(), sampler=grpo_sampler,
        args=DiffusionGRPOConfig(str(out_dir / "grpo"), num_generations=2, max_completion_length=COMPLETION_LENGTH,
                                 temperature=1.0, **train_args(precision)))
    grpo.train()
    if not rollouts:
        recorded["grpo"] = grpo_sampler.rollouts

    return ChainResult(
        cft=step_log(cft), sampler_replay_error=(lp[keep] - out.logprobs[keep]).abs().max().item(),
        sampler_vs_float32_replay=(lp32[keep] - out.logprobs[keep]).abs().max().item(),
        completion_tokens=int(keep.sum()), opd=step_log(opd), grpo=step_log(grpo), rollouts=recorded)


def finite(log: dict, *keys: str) -> bool:
    return all(math.isfinite(log[k]) for k in keys)
