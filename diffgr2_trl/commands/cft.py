"""``diffgr2 cft``: conversion fine-tuning from the command line (TRL flags; ``--config file.yaml`` too).

    diffgr2 cft --model_name_or_path DIR --dataset_name DATA --output_dir OUT [--block_size 32 for an AR model]
                [--answer_weight 2.0] [--use_peft --lora_r 16] [--load_in_4bit] [--use_cpu]

``DATA`` is a ``save_to_disk`` directory, a JSONL/JSON/Parquet/CSV file, or a hub dataset with ``prompt`` and
``completion`` columns (and optionally ``answer_start``), or ``messages`` (see
:class:`~diffgr2_trl.trainers.BlockDiffusionTrainer`); ``--dataset_config`` picks a hub dataset's configuration and,
with an ``--eval_strategy`` other than ``no``, ``--dataset_test_split`` is the eval dataset. The model may be a
converted checkpoint or a plain AR model (then ``--block_size`` converts it first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, get_peft_config

from ..trainers import BlockDiffusionConfig, BlockDiffusionTrainer
from ._args import parse_command
from ._common import load_for_training, load_script_datasets, train_and_save


@dataclass
class CFTScriptArguments(ScriptArguments):
    """TRL's script arguments (``--dataset_name``, ``--dataset_train_split``, ...), plus ``allow_other_data``: train a
    model that was trained on other prepared data (other semantic IDs or tokenizer) anyway."""

    allow_other_data: bool = field(
        default=False,
        metadata={"help": "Use a model trained on other prepared data (other semantic IDs/tokenizer) anyway."},
    )


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(CFTScriptArguments, BlockDiffusionConfig, ModelConfig)``; CPU training by default on a machine without
    CUDA."""
    return parse_command("cft", (CFTScriptArguments, BlockDiffusionConfig, ModelConfig), argv, values, trainer=True)


def run(script_args: CFTScriptArguments, training_args: BlockDiffusionConfig, model_args: ModelConfig) -> None:
    """Train and save to ``training_args.output_dir``."""
    if not model_args.model_name_or_path or not script_args.dataset_name:
        raise SystemExit("diffgr2 cft needs --model_name_or_path and --dataset_name.")
    from ..rerank.pipeline_data import check_model_data, record_training_data

    check_model_data(model_args.model_name_or_path, script_args.dataset_name, script_args.allow_other_data)
    model, tokenizer = load_for_training(model_args.model_name_or_path, model_args, training_args.trust_remote_code)
    train, evaluation = load_script_datasets("cft", script_args, training_args)
    trainer = BlockDiffusionTrainer(
        model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, tokenizer, training_args.output_dir, training_args.resume_from_checkpoint)
    record_training_data(training_args.output_dir, script_args.dataset_name)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
