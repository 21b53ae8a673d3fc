"""``diffgr2 cft``: conversion fine-tuning from the command line (TRL flags; ``--config file.yaml`` too).

    diffgr2 cft --model_name_or_path DIR --dataset_name DATA --output_dir OUT [--block_size 32 for an AR model]
                [--answer_weight 2.0] [--use_peft --lora_r 16] [--load_in_4bit] [--use_cpu]

``DATA`` is a ``save_to_disk`` directory, a JSONL/JSON/Parquet/CSV file, or a hub dataset with ``prompt`` and
``completion`` columns (and optionally ``answer_start``). The model may be a converted checkpoint or a plain AR
model (then ``--block_size`` converts it first).
"""

from __future__ import annotations

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..trainers import BlockDiffusionConfig, BlockDiffusionTrainer
from ._common import load_any_dataset, load_for_training, train_and_save


def main(argv: list[str]) -> int:
    parser = TrlParser((ScriptArguments, BlockDiffusionConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not model_args.model_name_or_path or not script_args.dataset_name:
        raise SystemExit("diffgr2 cft needs --model_name_or_path and --dataset_name.")
    model, tokenizer = load_for_training(model_args.model_name_or_path, model_args)
    train = load_any_dataset(script_args.dataset_name, script_args.dataset_train_split)
    trainer = BlockDiffusionTrainer(
        model, args=training_args, train_dataset=train, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, tokenizer, training_args.output_dir, training_args.resume_from_checkpoint)
    return 0
