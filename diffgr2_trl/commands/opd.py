"""``diffgr2 opd``: on-policy distillation of a block-diffusion student from an AR teacher (TRL flags too).

    diffgr2 opd --model_name_or_path CFT_DIR --teacher SPEC --dataset_name DATA --output_dir OUT
                [--num_generations 4 --max_completion_length 160 --tau 0.9 --temperature 1.0]
                [--replay one_state_per_block] [--beta 0.0] [--use_peft --lora_r 16] [--use_cpu]

``SPEC`` is a checkpoint directory (in-process HF teacher, full-vocabulary KL), ``http://host:port`` (a vLLM server,
e.g. ``diffgr2 serve-teacher``; top-k + tail KL) or ``vllm:DIR`` (in-process vLLM). ``DATA`` is a ``save_to_disk``
directory, a JSONL/JSON/Parquet/CSV file or a hub dataset with a ``prompt`` column (other columns are kept).
``--config file.yaml`` works as for every TRL script. ``--model`` and ``--dataset`` are deprecated spellings of
``--model_name_or_path`` and ``--dataset_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, get_peft_config

from ..trainers.opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer
from ._args import parse_command
from ._common import load_any_dataset, load_for_training, train_and_save


@dataclass
class OPDScriptArguments:
    """Arguments of ``diffgr2 opd`` besides the trainer's and the model's (the student is ``ModelConfig``'s
    ``--model_name_or_path``, a converted (CFT) directory).

    Parameters:
        teacher: teacher spec (sets ``teacher_model``): a path, ``http://host:port`` or ``vllm:PATH``.
        dataset_name: prompt dataset (directory, file or hub name).
        dataset_train_split / dataset_test_split: the splits to train and (optionally) evaluate on, named as in TRL's
            ``ScriptArguments`` (``--dataset_split`` / ``--eval_split``: deprecated spellings).
    """

    teacher: str | None = field(default=None, metadata={"help": "Teacher: a path, http://host:port or vllm:PATH."})
    dataset_name: str | None = field(default=None, metadata={"help": "Prompt dataset: directory, file or hub name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    allow_other_data: bool = field(
        default=False,
        metadata={"help": "Use a model trained on other prepared data (other semantic IDs/tokenizer) anyway."},
    )


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(OPDScriptArguments, OnPolicyDistillationConfig, ModelConfig)``; CPU training by default without CUDA."""
    return parse_command("opd", (OPDScriptArguments, OnPolicyDistillationConfig, ModelConfig), argv, values,
                         trainer=True)


def run(script: OPDScriptArguments, args: OnPolicyDistillationConfig, model_args: ModelConfig) -> None:
    """Distil and save to ``args.output_dir``."""
    model_path = model_args.model_name_or_path
    if not model_path or not script.dataset_name:
        raise SystemExit("diffgr2 opd needs --model_name_or_path (a converted student) and --dataset_name (prompts).")
    if script.teacher:
        args.teacher_model = script.teacher
    if not args.teacher_model:
        raise SystemExit("diffgr2 opd needs --teacher (a path, http://host:port or vllm:PATH).")
    from ..rerank.pipeline_data import check_model_data, record_training_data

    check_model_data(model_path, script.dataset_name, script.allow_other_data)
    model, tokenizer = load_for_training(model_path, model_args, args.trust_remote_code)
    train = load_any_dataset(script.dataset_name, script.dataset_train_split)
    evaluation = (load_any_dataset(script.dataset_name, script.dataset_test_split) if script.dataset_test_split
                  else None)
    trainer = OnPolicyDistillationTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, tokenizer, args.output_dir, args.resume_from_checkpoint)
    record_training_data(args.output_dir, script.dataset_name)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
