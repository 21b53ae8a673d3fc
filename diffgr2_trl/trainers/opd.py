"""On-policy distillation (OPD) of a block-diffusion student from a frozen autoregressive teacher.

Each micro-step: the student decodes ``num_generations`` trajectories per prompt with the real block sampler (eval
mode, no grad); the teacher scores each final sequence once (prompt + completion up to and including EOS, AR token
shift, the mask token never sent); the student's distribution at every committed token is rebuilt at the canvas
state in which that token was committed (trajectory replay); the loss is the divergence between the two per
committed position, length-normalised per sequence, averaged over sequences.

Built on TRL's ``_BaseTrainer`` (a ``transformers.Trainer``): prompts come through an identity collator, rollouts
and teacher scoring happen in :meth:`_prepare_inputs` (as TRL's own distillation/GRPO trainers do), and only
:meth:`compute_loss` touches gradients, so PEFT, gradient accumulation, checkpoint/resume and ``accelerate``
multi-process runs work as in any Trainer.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl.trainer.base_config import _BaseConfig
from trl.trainer.base_trainer import _BaseTrainer

from ..block_diffusion import BlockDiffusionSampler, get_spec, left_pad
from ..block_diffusion.likelihood import replay_logits, sample_block_steps
from ..teachers import HFTeacher, Teacher, TeacherResponseError, check_vocab_compatible, load_teacher
from .opd_loss import divergence, full_vocab_logprobs, kl_div, topk_tail_logprobs

__all__ = ["OnPolicyDistillationConfig", "OnPolicyDistillationTrainer"]

REPLAY_MODES = ("all", "one_state_per_block")


@dataclass
class OnPolicyDistillationConfig(_BaseConfig):
    """Configuration for :class:`OnPolicyDistillationTrainer` (all of ``transformers.TrainingArguments``, plus below).

    ``per_device_train_batch_size`` counts *prompts*; each micro-step trains on ``per_device_train_batch_size *
    num_generations`` trajectories.

    Parameters:
        teacher_model: the AR teacher: a checkpoint path / hub id (in-process HF), ``"http://host:port"`` (a vLLM
            server, e.g. ``diffgr2 serve-teacher``) or ``"vllm:PATH"`` (in-process vLLM). Ignored when a
            :class:`~diffgr2_trl.teachers.Teacher` is passed to the trainer.
        teacher_tokenizer: tokenizer path for the vocabulary check; default: the teacher's own directory (for a
            server, the directory it serves, when it is on this machine).
        teacher_kwargs: keyword arguments for the teacher backend (a dict, or a JSON string on the command line).
        teacher_top_k: teacher log-probs per position for the top-k + tail KL.
        full_vocab: full-vocabulary KL (in-process HF teacher only). ``None``: full when the teacher supports it.
        num_generations: trajectories per prompt (4 in the paper).
        max_new_tokens / tau / tokens_per_step / temperature / top_k: the sampler's decoding settings for rollouts
            (see :meth:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler.generate`).
        max_prompt_length: keep only the last this many prompt tokens (``None``: no truncation).
        replay: ``"all"`` distills every committed token at its commit state; ``"one_state_per_block"`` draws one
            denoising step per block and distills only the tokens committed at that step (one packed stream instead
            of one per step; those tokens are weighted by the block's number of steps, so the loss stays an unbiased
            estimate of the ``"all"`` loss).
        max_streams_per_forward: bound the step states packed in one replay forward (memory), ``"all"`` only.
        beta: 0 = forward KL(teacher || student) (the paper's), 1 = reverse KL, between = generalised JSD.
        loss_temperature: softmax temperature of both distributions in the loss.
    """

    teacher_model: str | None = field(default=None, metadata={"help": "Teacher: a path, http://host:port or vllm:PATH."})
    teacher_tokenizer: str | None = field(default=None, metadata={"help": "Teacher tokenizer path (vocabulary check)."})
    teacher_kwargs: dict | str | None = field(default=None, metadata={"help": "Teacher backend kwargs (JSON)."})
    teacher_top_k: int = field(default=20, metadata={"help": "Teacher top-k log-probs per position (top-k KL)."})
    full_vocab: bool | None = field(default=None, metadata={"help": "Full-vocabulary KL (HF teacher). Default: auto."})
    num_generations: int = field(default=4, metadata={"help": "Student trajectories per prompt."})
    max_new_tokens: int = field(default=128, metadata={"help": "Completion tokens per rollout."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Left-truncate prompts to this length."})
    tau: float = field(default=0.9, metadata={"help": "Sampler confidence threshold."})
    tokens_per_step: int | None = field(default=None, metadata={"help": "Fixed commits per step (overrides tau)."})
    temperature: float = field(default=1.0, metadata={"help": "Rollout sampling temperature (0 = greedy)."})
    top_k: int | None = field(default=None, metadata={"help": "Rollout top-k filter."})
    replay: str = field(default="all", metadata={"help": "'all' or 'one_state_per_block'."})
    max_streams_per_forward: int | None = field(default=None, metadata={"help": "Step states per replay forward."})
    beta: float = field(default=0.0, metadata={"help": "0 forward KL, 1 reverse KL, between: generalised JSD."})
    loss_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature in the loss."})
    # Prompt-only rows: keep every column (valid_fn may read them); the identity collator ignores the rest.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns (valid_fn reads them)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing of the student."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.teacher_kwargs, str):
            self.teacher_kwargs = json.loads(self.teacher_kwargs)
        if self.num_generations <= 0:
            raise ValueError(f"num_generations must be a positive integer, got {self.num_generations}.")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"replay must be one of {REPLAY_MODES}, got {self.replay!r}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}.")
        if self.loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be > 0, got {self.loss_temperature}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.tokens_per_step is None and not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}.")
        if self.teacher_top_k <= 0:
            raise ValueError(f"teacher_top_k must be positive, got {self.teacher_top_k}.")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be positive, got {self.max_prompt_length}.")


def _identity(features):
    return features


class OnPolicyDistillationTrainer(_BaseTrainer):
    """On-policy distillation of a converted block-diffusion student from an AR teacher.

    Args:
        model: a converted student (``PreTrainedModel``) or its path.
        teacher: a :class:`~diffgr2_trl.teachers.Teacher`, or ``None`` to build one from ``args.teacher_model``.
        args: :class:`OnPolicyDistillationConfig`.
        train_dataset / eval_dataset: prompt-only rows: a ``prompt`` column, plain text or conversational.
        processing_class: the student tokenizer (default: loaded from ``model`` when it is a path).
        teacher_tokenizer: the teacher's tokenizer (object or path) for the vocabulary check; see the config.
        valid_fn: rollout validity for the metric: ``valid_fn(prompts, completions, **columns) -> list[bool]``
            (TRL reward signature, decoded text). Default: the completion ends with EOS.
        peft_config: a PEFT config to wrap the student with (LoRA / QLoRA).

    Example:
        >>> args = OnPolicyDistillationConfig("opd-out", teacher_model="http://127.0.0.1:8000", use_cpu=True)
        >>> OnPolicyDistillationTrainer("cft-out", args=args, train_dataset=prompts).train()
    """

    _tag_names = ["trl", "diffgr2-trl", "block-diffusion", "on-policy-distillation"]
    _name = "OPD"

    def __init__(
        self,
        model,
        teacher: Teacher | None = None,
        args: OnPolicyDistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_tokenizer: PreTrainedTokenizerBase | str | None = None,
        valid_fn: Callable[..., list[bool]] | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args or OnPolicyDistillationConfig("opd-output")
        if isinstance(model, str):
            processing_class = processing_class or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if processing_class is None:
            raise ValueError("processing_class (the student tokenizer) is required when model is not a path.")
        self.spec = get_spec(model)  # raises with a clear message for an unconverted model
        for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
            cols = getattr(ds, "column_names", None)
            if ds is not None and cols is not None and "prompt" not in cols:
                raise ValueError(f"The {name} dataset has columns {cols}; on-policy distillation needs a 'prompt' column.")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if hasattr(model, "peft_config"):
            from peft.tuners.tuners_utils import BaseTunerLayer

            if isinstance(model.get_output_embeddings(), BaseTunerLayer):
                raise ValueError("A PEFT adapter on lm_head is not supported: trajectory replay applies the output "
                                 "layer's weight to gathered hidden states. Remove 'lm_head' from target_modules.")
            if args.gradient_checkpointing:
                model.enable_input_require_grads()

        tok = getattr(processing_class, "tokenizer", processing_class)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_token_id = tok.eos_token_id
        self.teacher = teacher if teacher is not None else self._load_teacher(args)
        self.student_only_ids = self._check_vocab(self.teacher, teacher_tokenizer, tok, args)
        self.teacher.forbidden_token_ids |= set(self.student_only_ids)
        self.full_vocab = self.teacher.supports_full_vocab if args.full_vocab is None else args.full_vocab
        if self.full_vocab and not self.teacher.supports_full_vocab:
            raise ValueError(f"full_vocab=True needs a teacher with full-vocabulary log-probs (HFTeacher); "
                             f"{type(self.teacher).__name__} returns top-k only: leave full_vocab unset.")
        if self.teacher.max_length is not None:
            for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
                self._check_context(ds, name, tok, args)
        self.valid_fn = valid_fn

        super().__init__(
            model=model, args=args, data_collator=_identity, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._times: dict[str, float] = {}
        # compute_loss returns a per-micro-batch mean: let Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _load_teacher(args: OnPolicyDistillationConfig) -> Teacher:
        if args.teacher_model is None:
            raise ValueError("No teacher: pass teacher=... or set teacher_model (a path, http://host:port or vllm:PATH).")
        return load_teacher(args.teacher_model, **(args.teacher_kwargs or {}))

    def _check_vocab(self, teacher: Teacher, teacher_tokenizer, student_tokenizer, args) -> list[int]:
        if teacher_tokenizer is None:
            teacher_tokenizer = args.teacher_tokenizer or self._teacher_dir(teacher, args)
        if teacher_tokenizer is None:
            raise ValueError(f"Cannot tell which tokenizer the {type(teacher).__name__} teacher uses: set "
                             "teacher_tokenizer (a path) so the student/teacher vocabularies can be checked.")
        if isinstance(teacher_tokenizer, str):
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_tokenizer)
        # vocab_size of a server teacher is read from the server: an unreachable URL fails here, at start-up.
        return check_vocab_compatible(teacher.vocab_size, teacher_tokenizer, student_tokenizer,
                                      mask_token_id=self.spec.mask_token_id)

    @staticmethod
    def _teacher_dir(teacher: Teacher, args) -> str | None:
        spec = args.teacher_model
        if isinstance(teacher, HFTeacher):
            return spec if spec else getattr(teacher.model, "name_or_path", None) or None
        if spec and spec.startswith("vllm:"):
            return spec[len("vllm:"):]
        info = getattr(teacher, "_model_info", None)  # VLLMServerTeacher: /v1/models names the served directory
        if callable(info):
            import os

            root = info().get("root")
            return root if root and os.path.isdir(root) else None
        return None

    def _check_context(self, dataset, name, tokenizer, args) -> None:
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        limit = self.teacher.max_length
        for i, row in enumerate(dataset):
            n = len(self._tokenize_prompt(row["prompt"], tokenizer, args.max_prompt_length))
            if n + args.max_new_tokens > limit:
                raise ValueError(
                    f"Row {i} of the {name} dataset has a {n}-token prompt; with max_new_tokens={args.max_new_tokens} "
                    f"the scored sequence can reach {n + args.max_new_tokens} tokens, more than the teacher's context "
                    f"of {limit}. Set max_prompt_length (left truncation) or lower max_new_tokens."
                )

    @staticmethod
    def _tokenize_prompt(prompt, tokenizer, max_prompt_length: int | None) -> list[int]:
        if isinstance(prompt, list):  # conversational
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        elif isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"A prompt must be text or a list of chat messages, got {type(prompt).__name__}.")
        if not ids:
            raise ValueError(f"Prompt {prompt!r} tokenizes to nothing.")
        return ids[-max_prompt_length:] if max_prompt_length else ids

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    # ------------------------------------------------------------------ rollouts + teacher
    def _prepare_inputs(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Roll out the student on the prompts, score with the teacher; returns the tensors ``compute_loss`` needs."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        k = args.num_generations
        prompts = [self._tokenize_prompt(row["prompt"], tok, args.max_prompt_length) for row in inputs]
        prompts = [p for p in prompts for _ in range(k)]
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id, device=device)

        t0 = time.perf_counter()
        student = self.accelerator.unwrap_model(self.model)
        was_training = student.training
        student.eval()
        try:
            sampler = BlockDiffusionSampler(student, spec=self.spec, pad_token_id=self.pad_token_id,
                                            eos_token_id=self.eos_token_id)
            out = sampler.generate(prompt_ids, prompt_mask, max_new_tokens=args.max_new_tokens, tau=args.tau,
                                   tokens_per_step=args.tokens_per_step, temperature=args.temperature, top_k=args.top_k)
        finally:
            student.train(was_training)
        t1 = time.perf_counter()

        comp_mask = out.completion_mask & (out.step_map >= 0)
        lengths = comp_mask.sum(-1)
        sequences = [p + out.completion_ids[r, : int(lengths[r])].tolist() for r, p in enumerate(prompts)]
        starts = [len(p) for p in prompts]
        scores = self.teacher.score(sequences, starts, top_k=0 if self.full_vocab else args.teacher_top_k,
                                    full_vocab=self.full_vocab)
        teacher = self._dense_teacher(scores, lengths, out.completion_ids.shape[1], device)
        t2 = time.perf_counter()

        if args.replay == "one_state_per_block":
            block_steps, selected, weight = sample_block_steps(out.step_map, self.spec.block_size, comp_mask)
        else:
            block_steps, selected, weight = None, comp_mask, comp_mask.float()

        self._log_rollouts(mode, inputs, out, comp_mask, t1 - t0, t2 - t1)
        return {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "canvas_ids": out.canvas_ids,
            "step_map": out.step_map, "completion_mask": comp_mask, "selected": selected, "weight": weight,
            "block_steps": block_steps, "sampler_logprobs": out.logprobs, **teacher,
        }

    def _dense_teacher(self, scores, lengths: torch.Tensor, width: int, device) -> dict[str, torch.Tensor]:
        """Right-pad the teacher's per-sequence scores to ``(rows, width, ...)`` after checking every position came back."""
        rows = len(lengths)
        if len(scores) != rows:
            raise TeacherResponseError(f"The teacher returned scores for {len(scores)} sequences, expected {rows}.")
        for r in range(rows):
            got, want = scores.token_logprobs[r].shape[0], int(lengths[r])
            if got != want:
                raise TeacherResponseError(
                    f"The teacher returned {got} completion positions for sequence {r}, expected {want}: every "
                    "committed token needs a teacher distribution (did the backend truncate the sequence?)."
                )
        token_lp = torch.zeros(rows, width, device=device)
        for r in range(rows):
            token_lp[r, : int(lengths[r])] = scores.token_logprobs[r].to(device)
        dense = {"teacher_token_logprobs": token_lp}
        if self.full_vocab:
            v = scores.full_logprobs[0].shape[-1]
            full = torch.zeros(rows, width, v, device=device)
            for r in range(rows):
                full[r, : int(lengths[r])] = scores.full_logprobs[r].to(device)
            dense["teacher_full_logprobs"] = full
        else:
            kk = scores.topk_ids[0].shape[-1]
            ids = torch.zeros(rows, width, kk, dtype=torch.long, device=device)
            lps = torch.full((rows, width, kk), -math.log(kk), device=device)  # any valid distribution on padding
            for r in range(rows):
                ids[r, : int(lengths[r])] = scores.topk_ids[r].to(device)
                lps[r, : int(lengths[r])] = scores.topk_logprobs[r].to(device)
            dense["teacher_topk_ids"], dense["teacher_topk_logprobs"] = ids, lps
        return dense

    def _log_rollouts(self, mode, inputs, out, comp_mask, rollout_time, teacher_time) -> None:
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        k = self.args.num_generations
        if self.valid_fn is not None:
            prompts = [row["prompt"] for row in inputs for _ in range(k)]
            texts = tok.batch_decode(out.completion_ids.masked_fill(~comp_mask, self.pad_token_id), skip_special_tokens=True)
            columns = {c: [row[c] for row in inputs for _ in range(k)] for c in inputs[0] if c != "prompt"}
            valid = torch.tensor([bool(v) for v in self.valid_fn(prompts=prompts, completions=texts, **columns)])
        else:
            valid = ((out.completion_ids == self.eos_token_id) & comp_mask).any(-1)
        gather = self.accelerator.gather_for_metrics
        dev = self.accelerator.device
        stats = torch.tensor([float(comp_mask.sum()), float(out.row_forward_passes.sum()), float(valid.sum()),
                              float(valid.numel())], device=dev)
        stats = gather(stats[None]).sum(0)
        m = self._metrics[mode]
        m["rollout/tokens_per_forward"].append((stats[0] / stats[1].clamp_min(1)).item())
        m["rollout/validity"].append((stats[2] / stats[3].clamp_min(1)).item())
        m["rollout/mean_length"].append((stats[0] / stats[3].clamp_min(1)).item())
        m["time/rollout"].append(rollout_time)
        m["time/teacher"].append(teacher_time)
        self._times = {"rollout": rollout_time, "teacher": teacher_time}

    # ------------------------------------------------------------------ loss
    def _student_logits(self, student, inputs) -> torch.Tensor:
        return replay_logits(
            student, inputs["prompt_ids"], inputs["prompt_mask"], inputs["canvas_ids"], inputs["step_map"], self.spec,
            max_streams_per_forward=self.args.max_streams_per_forward, block_steps=inputs["block_steps"],
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        # `model` may be the DDP wrapper: the replay calls it (so gradients are synchronised across processes) and
        # reads attributes such as the LM head from the model inside.
        logits = self._student_logits(model, inputs)
        if self.full_vocab:
            s_logp, t_logp = full_vocab_logprobs(logits, inputs["teacher_full_logprobs"], args.loss_temperature,
                                                 exclude_ids=self.student_only_ids)
        else:
            s_logp, t_logp = topk_tail_logprobs(logits, inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"],
                                                args.loss_temperature)
        per_token = divergence(s_logp, t_logp, args.beta)
        weight = inputs["weight"]
        # Length-normalised per sequence (by its committed tokens), then averaged over sequences.
        n_tokens = inputs["completion_mask"].sum(-1)
        has = n_tokens > 0
        per_seq = (per_token * weight).sum(-1) / n_tokens.clamp_min(1)
        loss = per_seq[has].mean() if has.any() else per_token.sum() * 0.0

        with torch.no_grad():
            sel = inputs["selected"]
            fkl = per_token if args.beta == 0.0 else kl_div(t_logp, s_logp)
            # What the sampler saw vs the replay: the invariant that makes the loss on-policy.
            roll_logits = logits if args.temperature <= 0 else logits / args.temperature
            replay_lp = torch.log_softmax(roll_logits.detach(), -1).gather(-1, inputs["canvas_ids"][..., None])[..., 0]
            err = ((replay_lp - inputs["sampler_logprobs"]).abs() * sel).amax() if sel.any() else replay_lp.new_zeros(())
            student_lp = torch.log_softmax(logits.detach(), -1).gather(-1, inputs["canvas_ids"][..., None])[..., 0]
            stats = torch.stack([
                (fkl * sel).sum(), (per_token.detach() * sel).sum(), sel.sum().float(),
                (inputs["teacher_token_logprobs"] * inputs["completion_mask"]).sum(),
                (student_lp * sel).sum(), inputs["completion_mask"].sum().float(),
            ])
            stats = self.accelerator.gather_for_metrics(stats[None]).sum(0)
            err = self.accelerator.gather_for_metrics(err[None]).max()
        m = self._metrics[mode]
        m["kl"].append((stats[0] / stats[2].clamp_min(1)).item())
        if args.beta != 0.0:
            m["divergence"].append((stats[1] / stats[2].clamp_min(1)).item())
        m["teacher/token_logprob"].append((stats[3] / stats[5].clamp_min(1)).item())
        m["student/token_logprob"].append((stats[4] / stats[2].clamp_min(1)).item())
        m["replay/max_logprob_error"].append(err.item())
        m["replay/distilled_fraction"].append((stats[2] / stats[5].clamp_min(1)).item())
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ Trainer hooks
    def training_step(self, model, inputs, num_items_in_batch=None):
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - t0
        rollout, teacher = self._times.get("rollout", 0.0), self._times.get("teacher", 0.0)
        m = self._metrics["train"]
        m["time/train"].append(max(total - rollout - teacher, 0.0))
        m["time/step"].append(total)
        m["time/teacher_share"].append(teacher / total if total > 0 else 0.0)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                metrics[key] = sum(finite) / len(finite)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()
