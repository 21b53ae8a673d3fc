"""``diffgr2 opd``: on-policy distillation of a block-diffusion student from an AR teacher (TRL flags too).

    diffgr2 opd --model CFT_DIR --teacher SPEC --dataset DATA --output_dir OUT
                [--num_generations 4 --max_completion_length 160 --tau 0.9 --temperature 1.0]
                [--replay one_state_per_block] [--beta 0.0] [--use_peft --lora_r 16] [--use_cpu]

``SPEC`` is a checkpoint directory (in-process HF teacher, full-vocabulary KL), ``http://host:port`` (a vLLM server,
e.g. ``diffgr2 serve-teacher``; top-k + tail KL) or ``vllm:DIR`` (in-process vLLM). ``DATA`` is a ``save_to_disk``
directory, a JSONL/JSON/Parquet/CSV file or a hub dataset with a ``prompt`` column (other columns are kept).
``--config file.yaml`` works as for every TRL script.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from ..trainers.opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer
from ._common import load_any_dataset, load_for_training, train_and_save


@dataclass
class OPDScriptArguments:
    """Arguments of ``diffgr2 opd`` besides the trainer's and the model's.

    Parameters:
        model: the converted (CFT) student directory.
        teacher: teacher spec (sets ``teacher_model``): a path, ``http://host:port`` or ``vllm:PATH``.
        dataset: prompt dataset (directory, file or hub name).
        dataset_split: split to train on.
        eval_split: optional split to evaluate on.
    """

    model: str | None = field(default=None, metadata={"help": "Converted student directory."})
    teacher: str | None = field(default=None, metadata={"help": "Teacher: a path, http://host:port or vllm:PATH."})
    dataset: str | None = field(default=None, metadata={"help": "Prompt dataset: directory, file or hub name."})
    dataset_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})


def main(argv: list[str]) -> int:
    parser = TrlParser((OPDScriptArguments, OnPolicyDistillationConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(argv)
    model_path = script.model or model_args.model_name_or_path
    if not model_path or not script.dataset:
        raise SystemExit("diffgr2 opd needs --model (a converted student) and --dataset (prompts).")
    if script.teacher:
        args.teacher_model = script.teacher
    if not args.teacher_model:
        raise SystemExit("diffgr2 opd needs --teacher (a path, http://host:port or vllm:PATH).")
    model, tokenizer = load_for_training(model_path, model_args)
    train = load_any_dataset(script.dataset, script.dataset_split)
    evaluation = load_any_dataset(script.dataset, script.eval_split) if script.eval_split else None
    trainer = OnPolicyDistillationTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, tokenizer, args.output_dir, args.resume_from_checkpoint)
    return 0
