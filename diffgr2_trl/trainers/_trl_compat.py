"""The private TRL / transformers behaviour the trainers rely on, in one place.

Each function here reads or reproduces something that TRL or transformers does not promise across releases (an
attribute that appeared in one version, a hook's call order). When an upgrade changes one of them, the trainers keep
working if this module is fixed, and ``tests/trainers/test_trl_compat.py`` fails first: it checks the signatures of
every TRL method the trainers override against the installed TRL.
"""

from __future__ import annotations

import torch
from transformers import Trainer

__all__ = ["TRL_METHODS_RELIED_ON", "sum_across_ranks"]

# Private TRL methods the trainers override (or, last, call): (TRL class path, method name, the leading parameter
# names our override takes or our call passes, in order). The compat test checks that
# the installed TRL's method starts with exactly these and adds no required parameter after them: a renamed or
# reordered parameter would otherwise be passed into the wrong slot without an error.
TRL_METHODS_RELIED_ON: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("trl.SFTTrainer", "compute_loss", ("self", "model", "inputs", "return_outputs", "num_items_in_batch")),
    ("trl.SFTTrainer", "_prepare_dataset",
     ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name")),
    ("trl.SFTTrainer", "_set_signature_columns_if_needed", ("self",)),
    ("trl.SFTTrainer", "get_batch_samples", ("self", "epoch_iterator", "num_batches", "device")),
    ("trl.SFTTrainer", "save_model", ("self", "output_dir", "_internal_call")),
    ("trl.DistillationTrainer", "_generate_and_score_completions", ("self", "inputs")),
    ("trl.DistillationTrainer", "compute_loss", ("self", "model", "inputs", "return_outputs", "num_items_in_batch")),
    ("trl.DistillationTrainer", "training_step", ("self", "model", "inputs", "num_items_in_batch")),
    ("trl.GRPOTrainer", "_generate_single_turn",
     ("self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images")),
    ("trl.GRPOTrainer", "_get_per_token_logps_and_entropies",
     ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
      "compute_aux_loss")),
    ("trl.GRPOTrainer", "_calculate_rewards", ("self", "inputs", "prompts", "completions", "completion_ids_list")),
    ("trl.DistillationTrainer", "_tokenize_prompts", ("self", "prompts")),  # called: OPD tokenizes as GRPO does
    ("trl.GRPOTrainer", "_generate_and_score_completions", ("self", "inputs")),
    ("trl.GRPOTrainer", "_compute_loss", ("self", "model", "inputs")),
)


def sum_across_ranks(trainer: Trainer, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a float tensor of any shape) summed over every process; itself on one process.

    A collective: every rank must call it the same number of times, which holds for per-step loss normalisers since
    every rank runs every step.
    """
    if trainer.accelerator.num_processes == 1:
        return value
    return trainer.accelerator.reduce(value.float().contiguous(), reduction="sum")
