"""On-policy distillation (OPD) of a block-diffusion student from a frozen autoregressive teacher.

Each step: the student decodes ``num_generations`` trajectories per prompt with the block sampler (eval mode, no
grad); the teacher scores each final sequence once (prompt + completion up to and including EOS, AR token shift, the
mask token never sent); the student's distribution at every committed token is rebuilt at the canvas state in which
that token was committed (trajectory replay); the loss is the divergence between the two per committed position,
length-normalised per sequence, averaged over sequences.

Built on TRL's public :class:`trl.DistillationTrainer`, which already brings the on-policy machinery: prompt-only
datasets through an identity collator, one generation per gradient-accumulation window (the window's prompts are
rolled out at once and split into micro-batches), PEFT / QLoRA set-up, evaluation through the loss, metric logging,
model cards. Its teacher-model argument is left out (the teacher is a :class:`~diffgr2_trl.teachers.Teacher`
backend: in-process HF, a vLLM server or in-process vLLM), and three hooks change:

* :meth:`OnPolicyDistillationTrainer._generate_and_score_completions`: rollouts come from the block sampler
  (``sampler``, by default a :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler`) on the current student,
  keeping each rollout's committed canvas and step map, and the teacher backend scores them.
* :meth:`OnPolicyDistillationTrainer.compute_loss`: the divergence against the trajectory replay (TRL's chunked
  loss runs a causal forward, which is not the distribution a block-diffusion student sampled from).
* :meth:`OnPolicyDistillationTrainer.training_step`: adds the rollout / teacher / train time split to the logs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl import DistillationTrainer
from trl.models import unwrap_model_for_generation

from ..block_diffusion import BlockDecodingConfig, BlockDiffusionSampler, get_spec, left_pad
from ..block_diffusion.convert import check_attention_honours_masks
from ..block_diffusion.likelihood import replay_chunked, sample_block_steps
from ..teachers import Teacher, check_vocab_compatible, load_teacher
from ._launch import check_launch
from ._paper import DIFFUSION_GR2_PAPER
from ._quantized import keep_4bit_layers_trainable
from ._trl_compat import sum_across_ranks
from .opd_config import OnPolicyDistillationConfig
from .opd_loss import divergence, full_vocab_logprobs, kl_div, topk_tail_logprobs

__all__ = ["OnPolicyDistillationConfig", "OnPolicyDistillationTrainer"]

class OnPolicyDistillationTrainer(DistillationTrainer):
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
        sampler: the decoder that produces the rollouts; default: a
            :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler` with the decoding fields of ``args``
            (``BlockDecodingConfig.from_config(args)``). Any object with the sampler's
            ``generate(input_ids, attention_mask, *, model=...)`` returning a
            :class:`~diffgr2_trl.block_diffusion.SamplerOutput` can stand in; it is called with the current student.

    Example:
        >>> args = OnPolicyDistillationConfig("opd-out", teacher_model="http://127.0.0.1:8000", use_cpu=True)
        >>> OnPolicyDistillationTrainer("cft-out", args=args, train_dataset=prompts).train()
    """

    _tag_names = ["trl", "diffgr2-trl", "block-diffusion", "on-policy-distillation"]
    _name = "OPD"
    _paper = DIFFUSION_GR2_PAPER
    # compute_loss divides by the sequence count of the whole accumulation window on every rank, so Trainer must not
    # divide again (as TRL's DistillationTrainer declares; transformers >= 5.19 reads the flag in training_step).
    loss_is_scaled_for_ga = True

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
        sampler: BlockDiffusionSampler | None = None,
    ):
        args = args or OnPolicyDistillationConfig("opd-output")
        if not isinstance(args, OnPolicyDistillationConfig):
            raise TypeError(f"args must be an OnPolicyDistillationConfig, got {type(args).__name__}.")
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
        self.valid_fn = valid_fn

        # No teacher_model: the teacher is the backend above. TRL wraps the student with peft_config and refuses an
        # adapter on lm_head (the replay applies the output layer's weight to gathered hidden states too).
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers, peft_config=peft_config,
        )
        check_launch(self.accelerator)
        if self.teacher.max_length is not None:  # prompts are tokenized by TRL's hook, ready from here on
            for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
                self._check_context(ds, name)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        keep_4bit_layers_trainable(self.model)  # before any eval-mode forward (the probe below, rollouts)
        check_attention_honours_masks(base)
        self._times: dict[str, float] = {}
        self._teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Built once; each rollout hands it the current student (`generate(..., model=...)`).
        self.sampler = sampler if sampler is not None else BlockDiffusionSampler(
            spec=self.spec, config=BlockDecodingConfig.from_config(args), pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _load_teacher(args: OnPolicyDistillationConfig) -> Teacher:
        if args.teacher_model is None:
            raise ValueError("No teacher: pass teacher=... or set teacher_model (a path, http://host:port or vllm:PATH).")
        return load_teacher(args.teacher_model, **(args.teacher_kwargs or {}))

    def _check_vocab(self, teacher: Teacher, teacher_tokenizer, student_tokenizer, args) -> list[int]:
        if teacher_tokenizer is None:
            teacher_tokenizer = args.teacher_tokenizer or teacher.tokenizer_path()
        if teacher_tokenizer is None:
            raise ValueError(f"Cannot tell which tokenizer the {type(teacher).__name__} teacher uses: set "
                             "teacher_tokenizer (a path) so the student/teacher vocabularies can be checked.")
        if isinstance(teacher_tokenizer, str):
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_tokenizer)
        # vocab_size of a server teacher is read from the server: an unreachable URL fails here, at start-up.
        return check_vocab_compatible(teacher.vocab_size, teacher_tokenizer, student_tokenizer,
                                      mask_token_id=self.spec.mask_token_id)

    def _check_context(self, dataset, name) -> None:
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        args, limit = self.args, self.teacher.max_length
        prompts = dataset["prompt"] if hasattr(dataset, "column_names") else [row["prompt"] for row in dataset]
        lengths = [len(ids) for lo in range(0, len(prompts), 1024) for ids in self._prompt_ids(prompts[lo:lo + 1024])]
        for i, n in enumerate(lengths):
            if n + args.max_completion_length > limit:
                raise ValueError(
                    f"Row {i} of the {name} dataset has a {n}-token prompt; with max_completion_length="
                    f"{args.max_completion_length} the scored sequence can reach {n + args.max_completion_length} "
                    f"tokens, more than the teacher's context of {limit}. Set max_prompt_length (left truncation) or "
                    "lower max_completion_length."
                )

    def _prompt_ids(self, prompts: list) -> list[list[int]]:
        """Token ids of ``prompts`` through TRL's ``_tokenize_prompts``, the function GRPO tokenizes with too
        (special tokens, chat template and its kwargs as TRL applies them; SFT, hence CFT, tokenizes prompts the
        same way), left-truncated to ``max_prompt_length``."""
        for p in prompts:
            if not isinstance(p, str | list):
                raise ValueError(f"A prompt must be text or a list of chat messages, got {type(p).__name__}.")
        ids, images, _ = self._tokenize_prompts(prompts)
        if images is not None:
            raise ValueError("Prompts with images are not supported: the block sampler decodes text only.")
        keep = self.args.max_prompt_length
        out = []
        for prompt, row in zip(prompts, ids, strict=True):
            row = list(row)
            if not row:
                raise ValueError(f"Prompt {prompt!r} tokenizes to nothing.")
            out.append(row[-keep:] if keep else row)
        return out

    # ------------------------------------------------------------------ rollouts + teacher
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Roll out the student on the prompts, score with the teacher; returns the tensors ``compute_loss`` needs.

        Called by :meth:`trl.DistillationTrainer._prepare_inputs` once per generation batch (the prompts of a whole
        gradient-accumulation window in training), which it then splits into micro-batches.
        """
        args = self.args
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        k = args.num_generations
        prompts = [p for p in self._prompt_ids([row["prompt"] for row in inputs]) for _ in range(k)]
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id, device=device)

        t0 = time.perf_counter()
        # As TRL's own trainers roll out: the model out of its wrapper, ZeRO-3 parameters gathered once for the
        # whole rollout (FSDP2 gathers per forward; the sampler keeps the ranks in step either way).
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as student:
            was_training = student.training
            student.eval()
            try:
                out = self.sampler.generate(prompt_ids, prompt_mask, model=student)
            finally:
                student.train(was_training)
        t1 = time.perf_counter()

        comp_mask = out.completion_mask & (out.step_map >= 0)
        lengths = comp_mask.sum(-1)
        sequences = [p + out.completion_ids[r, : int(lengths[r])].tolist() for r, p in enumerate(prompts)]
        starts = [len(p) for p in prompts]
        scores = self.teacher.score(sequences, starts, top_k=0 if self.full_vocab else args.teacher_top_k,
                                    full_vocab=self.full_vocab)
        teacher = scores.to_dense(lengths, out.completion_ids.shape[1], device, self.full_vocab)
        # The lazy full-vocabulary form needs the teacher's output function; it is no tensor, so it stays here
        # rather than in the batch TRL splits into micro-batches.
        self._teacher_head = scores.full_head
        t2 = time.perf_counter()

        if args.replay == "one_state_per_block":
            block_steps, selected, weight = sample_block_steps(out.step_map, self.spec.block_size, comp_mask)
        else:
            block_steps, selected, weight = None, comp_mask, comp_mask.float()

        self._log_rollouts(mode, inputs, out, comp_mask, t1 - t0, t2 - t1)
        # The loss divides by the sequences (with at least one token) of the whole generation batch on every rank:
        # a 0-d tensor, so TRL's split into micro-batches hands it unchanged to each of them.
        num_sequences = (comp_mask.sum(-1) > 0).sum().float()
        if args.average_tokens_across_devices:
            num_sequences = sum_across_ranks(self, num_sequences)
        return {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "canvas_ids": out.canvas_ids,
            "step_map": out.step_map, "completion_mask": comp_mask, "selected": selected, "weight": weight,
            "block_steps": block_steps, "sampler_logprobs": out.logprobs, **teacher,
            "num_sequences": num_sequences,  # last: TRL's shuffle takes the batch size from the first entry
        }

    def _summed_across_ranks(self, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each named scalar summed over all ranks, in one gather."""
        stacked = torch.stack([v.detach().float().reshape(()).to(self.accelerator.device) for v in values.values()])
        return dict(zip(values, self.accelerator.gather_for_metrics(stacked[None]).sum(0)))

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
        s = self._summed_across_ranks(tokens=comp_mask.sum(), forwards=out.row_forward_passes.sum(),
                                      valid=valid.sum(), rollouts=torch.tensor(valid.numel()))
        m = self._metrics[mode]
        m["rollout/tokens_per_forward"].append((s["tokens"] / s["forwards"].clamp_min(1)).item())
        m["rollout/validity"].append((s["valid"] / s["rollouts"].clamp_min(1)).item())
        m["rollout/mean_length"].append((s["tokens"] / s["rollouts"].clamp_min(1)).item())
        m["time/rollout"].append(rollout_time)
        m["time/teacher"].append(teacher_time)
        self._times = {"rollout": rollout_time, "teacher": teacher_time}
        if self.log_completions:  # read by DistillationTrainer.log
            texts = tok.batch_decode(out.completion_ids.masked_fill(~comp_mask, self.pad_token_id),
                                     skip_special_tokens=True)
            self._logs["prompt"].extend(gather_object(tok.batch_decode(out.sequences[:, : out.prompt_length],
                                                                       skip_special_tokens=True)))
            self._logs["completion"].extend(gather_object(texts))

    # ------------------------------------------------------------------ loss
    def _teacher_chunk(self, inputs, columns: slice) -> torch.Tensor:
        """Teacher log-probs ``(batch, c, V)`` (full vocabulary) of completion columns ``columns``."""
        if "teacher_full_hidden" in inputs:
            if self._teacher_head is None:
                raise RuntimeError("Teacher hidden states without the teacher's output function: these inputs were "
                                   "not produced by this trainer's _generate_and_score_completions.")
            return self._teacher_head(inputs["teacher_full_hidden"][:, columns])
        return inputs["teacher_full_logprobs"][:, columns]

    def _per_token_terms(self, inputs, logits: torch.Tensor, columns: slice) -> tuple[torch.Tensor, ...]:
        """The loss and metric terms of completion columns ``columns`` from the student's replay logits there.

        Returns ``(divergence, forward KL, replay log-prob at the rollout temperature, student log-prob)``, each
        ``(batch, c)``; only the divergence carries a gradient.
        """
        # === 1. Both distributions on one support (student logits (b, c, V); teacher (b, c, V) or top-k (b, c, k))
        args = self.args
        if self.full_vocab:
            with torch.no_grad():
                teacher = self._teacher_chunk(inputs, columns)
            s_logp, t_logp = full_vocab_logprobs(logits, teacher, args.loss_temperature,
                                                 exclude_ids=self.student_only_ids)
        else:
            s_logp, t_logp = topk_tail_logprobs(logits, inputs["teacher_topk_ids"][:, columns],
                                                inputs["teacher_topk_logprobs"][:, columns], args.loss_temperature)
        # === 2. Per-position divergence (b, c)
        per_token = divergence(s_logp, t_logp, args.beta)
        # === 3. Metrics (b, c), no gradient
        with torch.no_grad():
            fkl = per_token.detach() if args.beta == 0.0 else kl_div(t_logp, s_logp)
            canvas = inputs["canvas_ids"][:, columns, None]
            # What the sampler saw vs the replay: the invariant that makes the loss on-policy.
            roll_logits = logits if args.temperature <= 0 else logits / args.temperature
            replay_lp = torch.log_softmax(roll_logits.detach(), -1).gather(-1, canvas)[..., 0]
            student_lp = torch.log_softmax(logits.detach(), -1).gather(-1, canvas)[..., 0]
        return per_token, fkl, replay_lp, student_lp

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        # `model` may be the DDP wrapper: the replay calls it (so gradients are synchronised across processes) and
        # reads attributes such as the LM head from the model inside. The output layer and the divergence run
        # `loss_chunk_size` positions at a time (rebuilt in backward): a (batch, T, V) tensor never exists.
        per_token, fkl, replay_lp, student_lp = replay_chunked(
            model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["canvas_ids"], inputs["step_map"], self.spec,
            functools.partial(self._per_token_terms, inputs), chunk_size=args.loss_chunk_size,
            max_streams_per_forward=args.max_streams_per_forward, block_steps=inputs["block_steps"],
        )
        weight = inputs["weight"]
        # Length-normalised per sequence (by its committed tokens), then averaged over the sequences of the whole
        # generation batch (every micro-batch, every rank): the single-process mean for any split across ranks and
        # accumulation steps. DDP/FSDP average gradients over ranks, hence the factor of their number.
        n_tokens = inputs["completion_mask"].sum(-1)
        per_seq = (per_token * weight).sum(-1) / n_tokens.clamp_min(1)
        num_sequences = inputs.get("num_sequences")
        if num_sequences is None:  # inputs not from _generate_and_score_completions: this micro-batch alone
            num_sequences = (n_tokens > 0).sum().float()
        ranks = self.accelerator.num_processes if args.average_tokens_across_devices and "num_sequences" in inputs else 1
        loss = per_seq.sum() * ranks / num_sequences.to(per_seq).clamp_min(1.0)

        with torch.no_grad():
            sel = inputs["selected"]
            err = ((replay_lp - inputs["sampler_logprobs"]).abs() * sel).amax() if sel.any() else replay_lp.new_zeros(())
            s = self._summed_across_ranks(
                kl=(fkl * sel).sum(), divergence=(per_token.detach() * sel).sum(), distilled=sel.sum(),
                teacher_logprob=(inputs["teacher_token_logprobs"] * inputs["completion_mask"]).sum(),
                student_logprob=(student_lp * sel).sum(), tokens=inputs["completion_mask"].sum(),
            )
            err = self.accelerator.gather_for_metrics(err[None]).max()
        m = self._metrics[mode]
        m["kl"].append((s["kl"] / s["distilled"].clamp_min(1)).item())
        if args.beta != 0.0:
            m["divergence"].append((s["divergence"] / s["distilled"].clamp_min(1)).item())
        m["teacher/token_logprob"].append((s["teacher_logprob"] / s["tokens"].clamp_min(1)).item())
        m["student/token_logprob"].append((s["student_logprob"] / s["distilled"].clamp_min(1)).item())
        m["replay/max_logprob_error"].append(err.item())
        m["replay/distilled_fraction"].append((s["distilled"] / s["tokens"].clamp_min(1)).item())
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
        # Rollouts run once per accumulation window: the window's later micro-steps spent no time on them.
        self._times = {}
        return loss
