"""Conversion fine-tuning (CFT): TRL's SFTTrainer with the masked block-diffusion objective.

Everything TRL's SFTTrainer does is kept (dataset handling for prompt/completion and conversational data, PEFT /
QLoRA, gradient accumulation, checkpointing, ``accelerate``); only the loss changes, in :meth:`compute_loss`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..block_diffusion import BlockDiffusionSpec, align_completions, block_diffusion_loss, get_spec, set_spec
from ..block_diffusion.convert import check_attention_honours_masks, convert_to_block_diffusion
from ..block_diffusion.spec import SPEC_KEY
from ..errors import OptionError
from ._launch import check_launch
from ._paper import DIFFUSION_GR2_PAPER
from ._quantized import keep_4bit_layers_trainable
from ._trl_compat import sum_across_ranks

logger = logging.getLogger(__name__)

# Where save_model writes the converted base model that an adapter of a model converted in memory points at.
CONVERTED_BASE_DIR = "block_diffusion_base"

SPEC_OVERRIDES = (
    "noise_per", "noise_schedule", "min_mask_ratio", "max_mask_ratio", "inverse_t_weighting", "complementary_masks",
)


@dataclass
class BlockDiffusionConfig(SFTConfig):
    r"""Configuration for :class:`BlockDiffusionTrainer`: all of :class:`trl.SFTConfig`, plus the fields below.

    Noise fields left at ``None`` keep the value in the model's block-diffusion spec; a value given here is written
    into the spec, so the checkpoint records what it was trained with.

    Parameters that control the conversion:

        block_size (`int` or `None`, *optional*, defaults to `None`):
            Block size used to convert a model that is not yet converted. Must match (or be `None`) for a converted
            model.

    Parameters that control the noise (see :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSpec`):

        noise_per (`str` or `None`, *optional*, defaults to `None`):
            ``"block"`` or ``"sequence"``: where the noise level t is drawn.
        noise_schedule (`str` or `None`, *optional*, defaults to `None`):
            ``"linear"`` or ``"cosine"`` mask-ratio schedule.
        min_mask_ratio (`float` or `None`, *optional*, defaults to `None`):
            Lower end of the noise level t.
        max_mask_ratio (`float` or `None`, *optional*, defaults to `None`):
            Upper end of the noise level t.
        inverse_t_weighting (`bool` or `None`, *optional*, defaults to `None`):
            Weight token losses by 1 / mask ratio.
        complementary_masks (`bool` or `None`, *optional*, defaults to `None`):
            Also train on each mask's complement.

    Parameters that control the loss:

        reasoning_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of completion tokens before the answer (segment 0).
        answer_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of answer tokens (segment 1).
        answer_start_column (`str`, *optional*, defaults to `"answer_start"`):
            Dataset column holding, per row, the character offset in ``completion`` where the answer starts
            (plain-text prompt/completion data). Alternatively give a ``segment_ids`` column with one 0/1 entry per
            completion token. Without either, every completion token is segment 0.
        loss_normalization (`str`, *optional*, defaults to `"masked"`):
            ``"masked"`` (mean over masked tokens) or ``"completion"`` (sum over masked tokens divided by the number
            of completion tokens, the MDLM ELBO estimator).
    """

    block_size: int | None = field(default=None, metadata={"help": "Block size to convert an unconverted model with."})
    noise_per: str | None = field(default=None, metadata={"help": "'block' or 'sequence': where t is drawn."})
    noise_schedule: str | None = field(default=None, metadata={"help": "'linear' or 'cosine' mask-ratio schedule."})
    min_mask_ratio: float | None = field(default=None, metadata={"help": "Lower end of the noise level t."})
    max_mask_ratio: float | None = field(default=None, metadata={"help": "Upper end of the noise level t."})
    inverse_t_weighting: bool | None = field(default=None, metadata={"help": "Weight token losses by 1/mask ratio."})
    complementary_masks: bool | None = field(default=None, metadata={"help": "Also train on each mask's complement."})
    reasoning_weight: float = field(default=1.0, metadata={"help": "Loss weight of reasoning tokens."})
    answer_weight: float = field(default=1.0, metadata={"help": "Loss weight of answer tokens."})
    answer_start_column: str = field(
        default="answer_start", metadata={"help": "Column with the answer's character offset in the completion."}
    )
    loss_normalization: str = field(default="masked", metadata={"help": "'masked' or 'completion'."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_normalization not in ("masked", "completion"):
            raise OptionError("loss_normalization", f"must be 'masked' or 'completion', got {self.loss_normalization!r}.")
        if self.block_size is not None and self.block_size <= 0:
            raise OptionError("block_size", f"must be a positive integer, got {self.block_size}.")
        if self.loss_type != "nll":  # compute_loss replaces SFTTrainer's loss: another type would be ignored
            raise OptionError("loss_type", f"must be 'nll' (the block-diffusion loss replaces SFT's loss; choose its "
                              f"normalisation with loss_normalization), got {self.loss_type!r}.")


@dataclass
class DataCollatorForBlockDiffusion(DataCollatorForLanguageModeling):
    """TRL's LM collator plus right-padded ``segment_ids`` (0 = reasoning, 1 = answer) when the rows carry them."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        if "segment_ids" in examples[0]:
            width = out["input_ids"].shape[1]
            segs = torch.zeros(len(examples), width, dtype=torch.long)
            for r, ex in enumerate(examples):
                s = torch.as_tensor(ex["segment_ids"][:width], dtype=torch.long)
                segs[r, : s.numel()] = s
            out["segment_ids"] = segs
        return out


def _split_last_assistant_turn(example: dict[str, Any], index: int, name: str) -> dict[str, Any]:
    messages = list(example["messages"])
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ValueError(f"Row {index} of the {name} dataset has no assistant turn; the last assistant turn is the "
                         "completion block-diffusion training learns.")
    if last != len(messages) - 1:
        raise ValueError(f"Row {index} of the {name} dataset ends with a {messages[-1].get('role')!r} turn after its "
                         "last assistant turn; that turn would be neither prompt nor completion. End every "
                         "conversation with the assistant turn to learn.")
    return {"prompt": messages[:last], "completion": messages[last:]}


def messages_to_prompt_completion(dataset, name: str = "train"):
    """A conversational ``messages`` dataset as conversational prompt/completion data: each row's last assistant turn
    is the completion, every turn before it the prompt (earlier assistant turns included: they are context, not
    trained on). Other datasets are returned unchanged. A row without an assistant turn, or with turns after its
    last one, is refused."""
    cols = getattr(dataset, "column_names", None) or []
    if "messages" not in cols or "prompt" in cols or "completion" in cols:
        return dataset
    return dataset.map(_split_last_assistant_turn, with_indices=True, fn_kwargs={"name": name},
                       remove_columns=["messages"], desc=f"Splitting the last assistant turn of the {name} dataset")


def _check_completions(dataset, name: str) -> None:
    cols = getattr(dataset, "column_names", None) or []
    if "input_ids" in cols:
        return  # already tokenized by the user: the labels must mark the completion
    if "completion" not in cols:
        raise ValueError(
            f"The {name} dataset has columns {cols}; block-diffusion training needs prompt/completion data "
            "(a 'prompt' and a 'completion' column, plain text or conversational) or conversational 'messages' "
            "(the last assistant turn is the completion)."
        )
    for i, c in enumerate(dataset["completion"]):
        if c is None or (isinstance(c, str) and not c.strip()) or (isinstance(c, list) and not c):
            raise ValueError(f"Row {i} of the {name} dataset has an empty completion; every row needs one.")


class BlockDiffusionTrainer(SFTTrainer):
    """CFT trainer: masked block-diffusion loss on the completion under the block-diffusion attention mask.

    Takes the same arguments as :class:`trl.SFTTrainer`. The model must be converted
    (:func:`~diffgr2_trl.convert_to_block_diffusion`) or ``args.block_size`` set to convert it here.

    Data: prompt/completion rows (plain text or conversational), or conversational ``messages`` rows, whose last
    assistant turn is the completion and every turn before it the prompt (the loss covers the completion only, so
    earlier assistant turns are context; see :func:`messages_to_prompt_completion`).

    Example:
        >>> trainer = BlockDiffusionTrainer(model, args=BlockDiffusionConfig("out", use_cpu=True),
        ...                                 train_dataset=ds, processing_class=tokenizer)
        >>> trainer.train()
    """

    _tag_names = ["trl", "sft", "diffgr2-trl", "block-diffusion", "cft"]
    _name = "CFT"
    _paper = DIFFUSION_GR2_PAPER
    # compute_loss divides by the whole optimizer step's normaliser (every micro-batch on every rank), so Trainer must
    # not divide again by the accumulation steps (read from the class by transformers >= 5.19; older releases are
    # handled in compute_loss through _trl_compat).
    loss_is_scaled_for_ga = True

    def __init__(self, model, args: BlockDiffusionConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = BlockDiffusionConfig("cft-output")
        if args.packing or args.padding_free:
            raise ValueError("Block-diffusion training needs one prompt+completion per row: set packing=False and "
                             "padding_free=False.")
        if train_dataset is not None:
            train_dataset = messages_to_prompt_completion(train_dataset, "train")
            _check_completions(train_dataset, "train")
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            eval_dataset = messages_to_prompt_completion(eval_dataset, "eval")
        if not isinstance(model, str) and processing_class is not None:
            self._maybe_convert(model, processing_class, args)
        if data_collator is None and processing_class is not None:
            pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else processing_class.eos_token_id
            data_collator = DataCollatorForBlockDiffusion(pad_token_id=pad, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        check_launch(self.accelerator)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if isinstance(model, str):
            self._maybe_convert(base, self.processing_class, args)
        keep_4bit_layers_trainable(self.model)  # before any eval-mode forward (the probe below, rollouts)
        check_attention_honours_masks(base)
        spec = get_spec(base)
        overrides = {k: getattr(args, k) for k in SPEC_OVERRIDES if getattr(args, k) is not None}
        if overrides:
            spec = BlockDiffusionSpec.from_dict({**spec.to_dict(), **overrides})
            set_spec(base, spec)
        self.spec = spec
        self.segment_weights = (args.reasoning_weight, args.answer_weight)
        if self.segment_weights != (1.0, 1.0):  # weights without segments would be dropped without a word
            for name, ds in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                cols = getattr(ds, "column_names", None)
                if cols is not None and "segment_ids" not in cols:
                    raise ValueError(
                        f"reasoning_weight={args.reasoning_weight} / answer_weight={args.answer_weight} need to know "
                        f"where the answer starts, but the prepared {name} dataset has no 'segment_ids' (columns: "
                        f"{cols}). Give the raw dataset an '{args.answer_start_column}' column (the character offset "
                        "of the answer in each plain-text completion) or a token-level 'segment_ids' column, or leave "
                        "both weights at 1.0.")
        self._step_weight: torch.Tensor | None = None
        self._step_batches_left = 0  # micro-batches of the current optimizer step still to use _step_weight

    @staticmethod
    def _maybe_convert(model, tokenizer, args) -> None:
        try:
            spec = get_spec(model)
        except ValueError:
            if args.block_size is None:
                raise
            convert_to_block_diffusion(model, tokenizer, block_size=args.block_size)
            return
        if args.block_size is not None and args.block_size != spec.block_size:
            raise ValueError(f"args.block_size={args.block_size} disagrees with the model's converted block size "
                             f"{spec.block_size}; leave block_size unset for a converted model.")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as :class:`trl.SFTTrainer` does, making a LoRA adapter loadable with stock PEFT.

        An adapter's ``adapter_config.json`` names its base model, which ``AutoPeftModelForCausalLM.from_pretrained``
        loads. When that base on disk is not the converted model (the model was converted in memory, here or by
        :func:`~diffgr2_trl.convert_to_block_diffusion`), the reloaded model would have no block-diffusion spec and
        no trained mask-token row. Then the converted base (frozen under LoRA: the same for every checkpoint) is
        written once to ``<args.output_dir>/block_diffusion_base`` with the tokenizer, and every adapter saved
        points at it by absolute path. Convert and save the base first (``diffgr2 convert``) to avoid the copy.
        """
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            self._point_adapters_at_converted_base(model)
        super().save_model(output_dir, _internal_call)

    def _point_adapters_at_converted_base(self, model) -> None:
        spec = get_spec(model).to_dict()

        def converted(path) -> bool:
            config = Path(str(path)) / "config.json"
            return config.is_file() and json.loads(config.read_text()).get(SPEC_KEY) == spec

        sources = {c.base_model_name_or_path for c in model.peft_config.values()}
        if all(src is not None and converted(src) for src in sources):
            return  # the adapters already point at a saved converted model
        base_dir = Path(self.args.output_dir).resolve() / CONVERTED_BASE_DIR
        if not converted(base_dir):
            base = model.get_base_model()
            if getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None:
                logger.warning(
                    "The adapter names the unconverted base %s; a quantized base is not re-saved. To reload it with "
                    "AutoPeftModelForCausalLM, convert and save the base first (diffgr2 convert), then train on it.",
                    sorted(map(str, sources)))
                return
            # A collective under FSDP/ZeRO-3 (every rank gathers), then the main process writes the base's own
            # weights: LoRA's base_layer / original_module tensors under their original names, adapter tensors left
            # out.
            state = self.accelerator.get_state_dict(model)
            if self.args.should_save:
                clean = {}
                for key, value in state.items():
                    if "lora_" in key or ".modules_to_save." in key:
                        continue
                    key = key.removeprefix("base_model.model.")
                    clean[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
                base.save_pretrained(base_dir, state_dict=clean)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(base_dir)
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_dir)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "segment_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "segment_ids"]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        cols = getattr(dataset, "column_names", None) or []
        column = getattr(args, "answer_start_column", None)
        if column and column in cols and "segment_ids" not in cols:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)

            def add_segments(example):
                if not isinstance(example.get("prompt"), str):
                    raise ValueError(f"'{column}' needs plain-text prompts; give a token-level 'segment_ids' column "
                                     "for conversational data.")
                offset = example[column]
                completion_mask = [lbl != -100 for lbl in example["labels"]]
                start = completion_mask.index(True) if True in completion_mask else len(completion_mask)
                if offset is None or offset < 0 or offset > len(example["completion"]):
                    raise ValueError(f"{column}={offset!r} is outside the completion (length "
                                     f"{len(example['completion'])}).")
                # Tokenize the text before the answer as TRL tokenized the row (special tokens included: a BOS the
                # tokenizer adds shifts every position by one) and find, as TRL finds the completion, where it
                # stops agreeing with the row's tokens: the answer starts there (a token that straddles the
                # boundary belongs to the answer).
                before = tokenizer(text=example["prompt"] + example["completion"][:offset])["input_ids"]
                answer_start = max(start, common_prefix_length(before, example["input_ids"]))
                segs = [0] * answer_start + [1] * (len(example["input_ids"]) - answer_start)
                return {"segment_ids": segs}

            dataset = dataset.map(add_segments, desc=f"Marking answer segments of the {dataset_name} dataset")
        return dataset

    def _aligned(self, inputs):
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        return align_completions(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"] != -100,
            block_size=self.spec.block_size,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            eos_token_id=tok.eos_token_id,
            segment_ids=inputs.get("segment_ids"),
        )

    def _completion_weight(self, batch) -> torch.Tensor:
        """Segment-weighted count of the completion tokens in an aligned batch (what ``"completion"`` divides by)."""
        comp = batch.completion.float()
        if batch.segment_ids is None:
            return comp.sum()
        weights = torch.tensor(self.segment_weights, dtype=torch.float32, device=comp.device)
        return (weights[batch.segment_ids] * comp).sum()

    def _across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return sum_across_ranks(self, value) if self.args.average_tokens_across_devices else value

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer fetches an optimizer step's micro-batches here; count their completion tokens on every rank, so
        that each micro-batch's loss is divided by the step's total (:meth:`compute_loss`)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        weight = torch.zeros((), device=device)
        for inputs in batch_samples:
            weight = weight + self._completion_weight(self._aligned(inputs)).to(device)
        self._step_weight = self._across_ranks(weight)
        self._step_batches_left = len(batch_samples)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The masked block-diffusion loss, normalised over the whole optimizer step.

        The token losses are summed and divided by one normaliser for all micro-batches of the step on all ranks, so
        the gradient is the single-process mean over the global batch whatever the split of tokens across ranks and
        accumulation steps (as TRL's SFT does with ``num_items_in_batch``). With ``loss_normalization="masked"`` the
        normaliser is the step's completion tokens times the micro-batch's masked fraction (across ranks): the
        number of masked tokens when every micro-batch is masked alike, since masks are drawn batch by batch and
        later micro-batches' masks are not known yet. Outside a training step (evaluation, a direct call) the
        normaliser is the micro-batch's, across ranks. ``average_tokens_across_devices=False`` keeps per-rank means.
        """
        mode = "train" if self.model.training else "eval"
        batch = self._aligned(inputs)
        loss_sum, m = block_diffusion_loss(
            model, batch, self.spec,
            segment_weights=self.segment_weights if batch.segment_ids is not None else None,
            loss_normalization=self.args.loss_normalization, reduction="sum",
        )
        counts = self._across_ranks(torch.stack([m["normaliser"], self._completion_weight(batch)]).to(loss_sum.device))
        normaliser = counts[0]
        # The step's normaliser serves its own micro-batches only: a direct call after train() gets the batch's.
        in_step = mode == "train" and self._step_weight is not None and self._step_batches_left > 0
        self._step_batches_left -= int(in_step)
        if in_step:
            normaliser = self._step_weight.to(counts) * counts[0] / torch.where(counts[1] > 0, counts[1], 1.0)
        # DDP/FSDP average gradients over ranks: a rank's share of the global sum is scaled back up by their number.
        ranks = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        loss = loss_sum * ranks / torch.where(normaliser > 0, normaliser, 1.0)
        gathered = {k: self.accelerator.gather_for_metrics(v.to(loss.device)).sum() for k, v in m.items()}
        masked = gathered["masked_total"].clamp_min(1)
        correct = sum(v for k, v in gathered.items() if k.startswith("correct/"))
        self._metrics[mode]["mask_ratio"].append((gathered["masked_total"] / gathered["completion_total"].clamp_min(1)).item())
        self._metrics[mode]["masked_token_accuracy"].append((correct / masked).item())
        names = ("reasoning", "answer") if batch.segment_ids is not None else ("completion",)
        for k, name in enumerate(names):
            count = gathered.get(f"masked/seg{k}")
            if count is not None and count > 0:
                self._metrics[mode][f"loss_{name}"].append((gathered[f"ce_sum/seg{k}"] / count).item())
        return (loss, None) if return_outputs else loss
