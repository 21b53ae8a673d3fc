"""Diffusion GRPO: TRL's GRPOTrainer with block-diffusion rollouts and block-diffusion likelihoods.

Everything TRL's GRPOTrainer does is kept: reward functions with TRL's signature (dataset columns as keyword
arguments, ``reward_weights``, async rewards, ``None`` = not applicable), group advantages, the loss types (DAPO by
default, GRPO, Dr.GRPO, ...), clipping, the KL to a reference when ``beta > 0``, PEFT, checkpointing, ``accelerate``,
logging and callbacks. Three hooks change:

* :meth:`DiffusionGRPOTrainer._generate_single_turn`: rollouts come from
  :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler` on the current policy; each rollout's committed canvas
  and step map are kept so its likelihood can be replayed.
* :meth:`DiffusionGRPOTrainer._get_per_token_logps_and_entropies`: per-token log-probs come from a block-diffusion
  likelihood estimator (:mod:`~diffgr2_trl.block_diffusion.estimators`): trajectory replay by default. The old and
  reference log-probs go through the same method, so the loss's ratios always use log-probs the trainer recomputed.
  The sampler's own per-token log-probs reach TRL only as ``sampling_per_token_logps``, which TRL reads for its
  off-policy sequence mask (``off_policy_mask_threshold``); under trajectory replay they equal the recomputed ones
  at the rollout's weights (tested).
* :meth:`DiffusionGRPOTrainer._calculate_rewards`: optional ``validity_fn`` (invalid rollouts get
  ``invalid_penalty`` and stay in their group) and a check that every reward function returns one number (or None)
  per completion; groups whose reward has zero variance are dropped from the loss.

The rollout-to-likelihood hand-off. A block-diffusion log-prob needs the rollout's canvas, step map and estimator
seeds, which TRL's ``_get_per_token_logps_and_entropies`` signature has no room for. So the trainer holds them in
``_rollout_ctx`` for exactly the calls that score that rollout:

- ``_generate_single_turn`` sets them. TRL then computes the old and reference log-probs inside
  ``_generate_and_score_completions``, which copies them into the batch and clears them on the way out;
- ``_compute_loss`` sets them from the batch around TRL's loss, which scores the policy.

This relies on TRL's call order (a rollout is scored after it is generated and before the next one), and
``tests/trainers/test_grpo.py::test_rollout_hand_off_follows_trls_call_order`` checks that order against the
installed TRL. A log-prob request without a matching rollout raises rather than scoring the wrong canvas.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from ..block_diffusion import BlockDecodingConfig, BlockDiffusionSampler, get_spec, left_pad
from ..block_diffusion.convert import check_attention_honours_masks
from ..block_diffusion.estimators import ESTIMATORS, check_estimator, estimate_token_logprobs
from ..errors import OptionError
from ._decoding_fields import refuse_unused_generation_settings, trl_field
from ._launch import check_launch
from ._paper import DIFFUSION_GR2_PAPER
from ._quantized import keep_4bit_layers_trainable

ROLLOUT_KEYS = ("canvas_ids", "step_map", "estimator_seeds")


@dataclass
class DiffusionGRPOConfig(BlockDecodingConfig, GRPOConfig):
    r"""Configuration for :class:`DiffusionGRPOTrainer`: all of :class:`trl.GRPOConfig` and of
    :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`, plus the fields below.

    TRL's generation fields keep their TRL declaration, default and meaning: ``temperature`` (0 = greedy), ``top_k``
    (0 = off), ``max_completion_length``, ``num_generations``. ``top_p`` / ``min_p`` / ``repetition_penalty`` are not
    supported by the block sampler and must stay at their defaults; ``use_vllm`` and
    ``use_transformers_continuous_batching`` must stay off (rollouts come from the block sampler).

    Parameters that control the block-diffusion rollouts:

        tau (`float`, *optional*, defaults to `0.9`):
            The sampler's confidence threshold in (0, 1]: each denoising step commits every masked position of the
            block whose confidence is at least ``tau``, plus the most confident one. Ignored when ``tokens_per_step``
            is set.
        tokens_per_step (`int` or `None`, *optional*, defaults to `None`):
            Fixed schedule instead of ``tau``: commit the ``tokens_per_step`` most confident positions per step.
        block_size (`int` or `None`, *optional*, defaults to `None`):
            Must stay `None`: rollouts are decoded with the model's block size, the one the likelihood uses.
        stop_token_ids (`list[int]` or `None`, *optional*, defaults to `None`):
            Token ids that end a rollout, in addition to the EOS token(s).

    Parameters that control the likelihood:

        likelihood_estimator (`str`, *optional*, defaults to `"trajectory_replay"`):
            How per-token log-probs of a rollout are computed: ``"trajectory_replay"`` (TraceRL, exact for the
            sampler), ``"mean_field"`` (d1's one-step estimate) or ``"elbo"`` (``elbo_samples`` random masks). See
            :mod:`diffgr2_trl.block_diffusion.estimators`.
        prompt_mask_prob (`float`, *optional*, defaults to `0.0`):
            ``"mean_field"`` only: probability of masking each prompt token (d1's regulariser), in [0, 1).
        elbo_samples (`int`, *optional*, defaults to `4`):
            ``"elbo"`` only: number of random masks K (complementary pairs; an odd K adds the all-masked one).
        max_streams_per_forward (`int` or `None`, *optional*, defaults to `None`):
            Bound the number of noisy streams packed in one likelihood forward (memory). ``None``: all in one.
        likelihood_recompute (`bool`, *optional*, defaults to `False`):
            ``"trajectory_replay"`` only: bound the likelihood's memory. Each forward chunk (``max_streams_per_forward``
            streams) and the output layer (1,024 token positions at a time) run under activation checkpointing and are
            rebuilt during backward, so neither every chunk's graph nor the ``(batch, T, V)`` logits are held until
            backward. Same log-probs and gradients, one more forward. Set ``max_streams_per_forward`` too (e.g. 1): it
            bounds the size of each forward, hence the peak.

    Parameters that control the rewards:

        invalid_penalty (`float`, *optional*, defaults to `-1.0`):
            Total reward given to a rollout that the trainer's ``validity_fn`` marks invalid (the paper's -1).
        drop_zero_std_groups (`bool`, *optional*, defaults to `True`):
            Mask groups whose total reward has zero variance out of the loss (they carry no advantage). TRL already
            logs their share as ``frac_reward_zero_std``.
    """

    # Declared by both bases: TRL's declaration wins (see diffgr2_trl.trainers._decoding_fields).
    max_completion_length: int | None = trl_field(GRPOConfig, "max_completion_length")
    temperature: float = trl_field(GRPOConfig, "temperature")
    top_k: int = trl_field(GRPOConfig, "top_k")

    likelihood_estimator: str = field(
        default="trajectory_replay", metadata={"help": f"Likelihood estimator, one of {list(ESTIMATORS)}."}
    )
    prompt_mask_prob: float = field(default=0.0, metadata={"help": "mean_field: prompt-token mask probability."})
    elbo_samples: int = field(default=4, metadata={"help": "elbo: number of random masks per sample."})
    max_streams_per_forward: int | None = field(
        default=None, metadata={"help": "Max noisy streams per likelihood forward (None: all in one)."}
    )
    likelihood_recompute: bool = field(
        default=False, metadata={"help": "trajectory_replay: recompute forward chunks and the output layer in backward."}
    )
    invalid_penalty: float = field(default=-1.0, metadata={"help": "Total reward of rollouts marked invalid."})
    drop_zero_std_groups: bool = field(default=True, metadata={"help": "Drop zero-reward-variance groups from the loss."})

    def __post_init__(self):
        GRPOConfig.__post_init__(self)  # BlockDecodingConfig comes first in the MRO and does not chain
        self.check_decoding()
        if self.block_size is not None:
            raise ValueError(f"block_size={self.block_size}: rollouts must be decoded with the model's own block size, "
                             "the one the likelihood uses; leave block_size unset for training.")
        check_estimator(self.likelihood_estimator)
        if not 0.0 <= self.prompt_mask_prob < 1.0:
            raise OptionError("prompt_mask_prob", f"must be in [0, 1), got {self.prompt_mask_prob}.")
        if self.elbo_samples < 1:
            raise OptionError("elbo_samples", f"must be >= 1, got {self.elbo_samples}.")
        if self.likelihood_recompute and self.likelihood_estimator != "trajectory_replay":
            raise OptionError("likelihood_recompute", "is implemented for likelihood_estimator='trajectory_replay' "
                              f"only, not {self.likelihood_estimator!r}.")
        if self.top_p != 1.0 or self.min_p is not None or self.repetition_penalty != 1.0:
            raise ValueError("The block-diffusion sampler supports temperature and top_k only: leave top_p=1.0, "
                             "min_p=None and repetition_penalty=1.0.")
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise ValueError("Rollouts come from the block-diffusion sampler: use_vllm and "
                             "use_transformers_continuous_batching are not supported.")
        refuse_unused_generation_settings(self)


def _as_reward(r: Any) -> float | None:
    """One reward as TRL reads it (``torch.tensor(..., dtype=float32)``): a Python, numpy or 0-d tensor bool / int /
    float becomes a float, ``None`` stays ``None`` (not applicable); anything else raises ``TypeError``."""
    if r is None:
        return None
    if isinstance(r, torch.Tensor | np.ndarray) and r.ndim == 0:
        r = r.item()
    if isinstance(r, bool | np.bool_ | numbers.Real):
        return float(r)
    raise TypeError


def _checked_reward(func: Callable, name: str) -> Callable:
    """Wrap a TRL reward function so its result reaches TRL as floats (or None), one per completion; a wrong length
    or a non-numeric entry fails with a message naming the function and the completion."""

    def check(out: Any, n: int) -> list:
        if isinstance(out, torch.Tensor | np.ndarray) and out.ndim == 1:
            out = list(out)
        if not isinstance(out, list | tuple):
            raise TypeError(f"Reward function {name!r} must return a list of floats (or None), got {type(out).__name__}.")
        if len(out) != n:
            raise ValueError(f"Reward function {name!r} returned {len(out)} rewards for {n} completions; it must "
                             "return exactly one per completion.")
        checked = []
        for i, r in enumerate(out):
            try:
                checked.append(_as_reward(r))
            except TypeError:
                raise TypeError(f"Reward function {name!r} returned {r!r} (type {type(r).__name__}) for completion "
                                f"{i}; rewards must be real numbers (bool, int, float, numpy scalars or 0-d tensors), "
                                "or None for 'not applicable'.") from None
        return checked

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            return check(await func(*args, **kwargs), len(kwargs["completions"]))

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return check(func(*args, **kwargs), len(kwargs["completions"]))

    return wrapper


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block; on exit every submodule gets back its own mode (not one blanket
    ``train()``, which would also switch on submodules the user had put in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class DiffusionGRPOTrainer(GRPOTrainer):
    """GRPO / DAPO / Dr.GRPO for block-diffusion LMs; same arguments as :class:`trl.GRPOTrainer`, plus
    ``validity_fn`` and ``sampler``.

    Args:
        sampler: the decoder that produces the rollouts; default: a
            :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler` with the decoding fields of ``args``
            (``BlockDecodingConfig.from_config(args)``). Any object with the sampler's
            ``generate(input_ids, attention_mask, *, model=...)`` returning a
            :class:`~diffgr2_trl.block_diffusion.SamplerOutput` (``canvas_ids`` and ``step_map`` included, for the
            likelihood) can stand in, e.g. another remasking rule. It is called with the current policy each time.
        validity_fn: optional function with TRL's reward signature (and TRL's keyword arguments: the dataset
            columns, ``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric``, ``environments``)
            returning, per completion, a true value for a valid rollout and a false one (``False``, ``0``, ``0.0``)
            for an invalid one, as bool / int / float / numpy scalar / 0-d tensor; ``None`` or NaN: not
            applicable, counts as valid. E.g. ``diffgr2_trl.rewards.rerank.validity``. Invalid rollouts get the
            total reward ``args.invalid_penalty`` and stay in their group (their negative advantage is the learning
            signal).

    Example:
        >>> trainer = DiffusionGRPOTrainer(model, reward_funcs=sort_reward, train_dataset=ds, processing_class=tok,
        ...                                args=DiffusionGRPOConfig("out", use_cpu=True, num_generations=4))
        >>> trainer.train()
    """

    _tag_names = ["trl", "grpo", "diffgr2-trl", "block-diffusion"]
    _name = "DiffusionGRPO"
    _paper = DIFFUSION_GR2_PAPER

    def __init__(self, model, reward_funcs=None, args: DiffusionGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, validity_fn: Callable | None = None,
                 sampler: BlockDiffusionSampler | None = None, **kwargs):
        if args is None:
            args = DiffusionGRPOConfig("diffusion-grpo-output")
        if not isinstance(args, DiffusionGRPOConfig):
            raise TypeError(f"args must be a DiffusionGRPOConfig, got {type(args).__name__}.")
        for unsupported in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{unsupported} is not supported: rollouts come from the block-diffusion sampler.")
        if validity_fn is not None and inspect.iscoroutinefunction(validity_fn):
            raise TypeError("validity_fn must be a plain (synchronous) function; async functions are supported as "
                            "reward_funcs only.")
        if not isinstance(model, str):
            get_spec(model)  # fail before TRL builds anything for an unconverted model
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        check_launch(self.accelerator)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.spec = get_spec(base)
        keep_4bit_layers_trainable(self.model)  # before any eval-mode forward (the probe below, rollouts)
        check_attention_honours_masks(base)
        self.reward_funcs = [
            f if isinstance(f, torch.nn.Module) else _checked_reward(f, n)
            for f, n in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        self.validity_fn = _checked_reward(validity_fn, getattr(validity_fn, "__name__", "validity_fn")) if validity_fn else None
        self._rollout_ctx: dict[str, torch.Tensor] | None = None  # the rollout the current log-prob call scores
        self._zero_std_rows: torch.Tensor | None = None
        self.timings = {"rollout": 0.0, "likelihood": 0.0}  # cumulative seconds, read by `diffgr2 bench-rl`
        # Built once; each rollout hands it the current policy (`generate(..., model=...)`).
        self.sampler = sampler if sampler is not None else BlockDiffusionSampler(
            spec=self.spec, config=BlockDecodingConfig.from_config(args),
            pad_token_id=self._tokenizer.pad_token_id, eos_token_id=list(self.eos_token_ids),
        )

    # ------------------------------------------------------------------------------------------------- rollouts
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("Multimodal prompts are not supported by the block-diffusion sampler.")
        t0 = time.perf_counter()
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        input_ids, attention_mask = left_pad(prompt_ids, pad_id, device=device)
        args = self.args
        with (
            unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as unwrapped,
            torch.no_grad(),
            # Eval mode: with LoRA (TRL's default lora_dropout 0.05) or any dropout, a train-mode rollout samples
            # from a perturbed policy whose log-probs no replay reproduces. The autocast is the one the likelihood
            # scores under, so the sampler's log-probs and the replay's are the same numbers.
            _eval_mode(unwrapped),
            self.accelerator.autocast(),
        ):
            out = self.sampler.generate(input_ids, attention_mask, model=unwrapped)
        width = args.max_completion_length  # fixed width, so rollouts of different generation batches stack
        canvas = _pad_right(out.canvas_ids, width, pad_id)
        step_map = _pad_right(out.step_map, width, -1)
        seeds = torch.randint(0, 2**31 - 1, (input_ids.shape[0],), device=device)
        self._rollout_ctx = {"canvas_ids": canvas, "step_map": step_map, "estimator_seeds": seeds}
        completion_ids = [c[m].tolist() for c, m in zip(out.completion_ids.cpu(), out.completion_mask.cpu(), strict=True)]
        logprobs = [lp[m].tolist() for lp, m in zip(out.logprobs.cpu(), out.completion_mask.cpu(), strict=True)]
        mode = "train" if self.model.training else "eval"
        rows = out.row_forward_passes.float()
        self._metrics[mode]["rollout/forward_passes_per_sample"].append(self._mean_over_ranks(rows.mean()))
        self._metrics[mode]["rollout/tokens_per_forward"].append(
            self._mean_over_ranks(out.completion_mask.sum() / rows.sum().clamp_min(1.0)))
        self.timings["rollout"] += time.perf_counter() - t0
        return completion_ids, logprobs

    def _mean_over_ranks(self, x: torch.Tensor) -> float:
        return self.accelerator.gather(x.detach().float().reshape(1).to(self.accelerator.device)).mean().item()

    def _generate_and_score_completions(self, inputs):
        try:
            output = super()._generate_and_score_completions(inputs)
            ctx = self._rollout_ctx
            if ctx is None:
                raise RuntimeError("No block-diffusion rollout was recorded for this batch.")
            output.update(ctx)
            if self.args.drop_zero_std_groups and self._zero_std_rows is not None:
                n = output["completion_ids"].shape[0]
                rows = self._zero_std_rows[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
                keep = (~rows).to(output["completion_mask"].dtype).unsqueeze(1)
                output["completion_mask"] = output["completion_mask"] * keep
                mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
                output["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
            return output
        finally:
            self._rollout_ctx = None
            self._zero_std_rows = None

    # ------------------------------------------------------------------------------------------------ likelihood
    def _compute_loss(self, model, inputs):
        self._rollout_ctx = {k: inputs[k] for k in ROLLOUT_KEYS}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._rollout_ctx = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """Per-token log-probs of the completions in ``input_ids`` under the block-diffusion policy ``model``.

        TRL passes ``[prompt || completion]``; the rollout's canvas, step map and estimator seeds, which TRL's
        signature has no room for, come from the batch being scored (set around the call).
        """
        ctx = self._rollout_ctx
        if ctx is None or ctx["canvas_ids"].shape[0] != input_ids.shape[0]:
            raise RuntimeError("Log-probs were requested for completions this trainer did not sample (no rollout "
                               "canvas / step map for them); DiffusionGRPOTrainer can only score its own rollouts.")
        t0 = time.perf_counter()
        prompt_len = input_ids.shape[1] - logits_to_keep
        bs = self.spec.block_size
        # Later columns never influence earlier ones, so cut the canvas at the block boundary past the longest
        # completion: the rest of that block stays (it was visible to the block's later steps).
        width = min(ctx["canvas_ids"].shape[1], -(-logits_to_keep // bs) * bs)
        batch_size = batch_size or input_ids.shape[0]
        logps, entropies, forwards, streams = [], [], 0, 0
        for lo in range(0, input_ids.shape[0], batch_size):
            hi = min(lo + batch_size, input_ids.shape[0])
            with self.accelerator.autocast():
                # `model` may be the DDP wrapper: the core calls it (gradient sync) and reads attributes inside it.
                est = estimate_token_logprobs(
                    model, self.args.likelihood_estimator,
                    input_ids[lo:hi, :prompt_len], attention_mask[lo:hi, :prompt_len],
                    ctx["canvas_ids"][lo:hi, :width], ctx["step_map"][lo:hi, :width], self.spec,
                    temperature=self.temperature if self.temperature > 0 else 1.0,
                    seeds=ctx["estimator_seeds"][lo:hi], prompt_mask_prob=self.args.prompt_mask_prob,
                    elbo_samples=self.args.elbo_samples, compute_entropy=compute_entropy,
                    max_streams_per_forward=self.args.max_streams_per_forward,
                    recompute=self.args.likelihood_recompute,
                )
            logps.append(_to_width(est.logps, logits_to_keep))
            if compute_entropy:
                entropies.append(_to_width(est.entropies, logits_to_keep))
            forwards, streams = forwards + est.forward_passes, streams + est.streams
        mode = "train" if self.model.training else "eval"
        chunks = -(-input_ids.shape[0] // batch_size)
        self._metrics[mode]["likelihood/forward_passes_per_sample"].append(forwards / chunks)
        self._metrics[mode]["likelihood/streams_per_sample"].append(streams / chunks)
        self.timings["likelihood"] += time.perf_counter() - t0
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # ---------------------------------------------------------------------------------------------------- rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        device = rewards_per_func.device
        weights = self.reward_weights.to(device)
        if self.validity_fn is not None:
            # The keyword arguments TRL's _calculate_rewards gives reward functions, so that any stock-TRL reward
            # can serve as the validity function unchanged.
            keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
            kwargs = {k: [x[k] for x in inputs] for k in keys}
            kwargs.update(trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric)
            if self.environments is not None:
                kwargs["environments"] = self.environments
            valid = self.validity_fn(prompts=prompts, completions=completions, completion_ids=completion_ids_list,
                                     **kwargs)
            # None (and NaN, TRL's form of None) is "not applicable" and counts as valid; other values by truth.
            invalid = torch.tensor([v is not None and not math.isnan(v) and not v for v in valid], device=device)
            invalid = gather(invalid)
            total = float(weights.sum())
            if total == 0:
                raise ValueError("validity_fn needs reward weights with a non-zero sum to give invalid_penalty.")
            # Spread the penalty over the functions so the weighted total TRL builds is exactly invalid_penalty.
            rewards_per_func[invalid] = self.args.invalid_penalty / total
            self._metrics[mode]["invalid_frac"].append(invalid.float().mean().item())
        g = self.num_generations if mode == "train" else self.num_generations_eval
        if self.multi_objective_aggregation == "sum_then_normalize":
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(1)
            rewards[torch.isnan(rewards_per_func).all(1)] = torch.nan
            std = nanstd(rewards.view(-1, g), dim=1)
        else:
            std = nanstd(rewards_per_func.view(-1, g, rewards_per_func.shape[1]), dim=1).nan_to_num(0.0).amax(-1)
        zero = torch.isclose(std.nan_to_num(0.0), torch.zeros_like(std))
        self._zero_std_rows = zero.repeat_interleave(g)
        return rewards_per_func


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], 1)


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad ``(batch, T)`` to ``width`` columns (TRL may pad completions to a multiple)."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], 1)
