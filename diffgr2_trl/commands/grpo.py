"""``diffgr2 grpo``: diffusion GRPO / DAPO from the command line (all TRL GRPO flags; ``--config file.yaml`` too).

    diffgr2 grpo --model_name_or_path DIR --dataset_name PATH --output_dir OUT
                 --reward_funcs diffgr2_trl.rewards.rerank.gr2_reward
                 [--validity_func diffgr2_trl.rewards.rerank.validity]
                 [--likelihood_estimator trajectory_replay|mean_field|elbo]
                 [--num_generations 8] [--tau 0.9] [--use_peft --lora_r 16] [--load_in_4bit] [--use_cpu]

``DIR`` is a converted block-diffusion checkpoint (``diffgr2 convert`` / ``diffgr2 cft`` output). ``PATH`` is a
``save_to_disk`` directory or a JSONL/JSON/Parquet/CSV file with a ``prompt`` column; every other column reaches the
reward functions as a keyword argument, as in TRL. Reward functions are dotted import paths, resolved like
``trl grpo --reward_funcs`` does (the current directory is importable, so a project's own ``my_rewards.fn`` works;
this package's rewards are ``diffgr2_trl.rewards.<module>.<fn>`` from anywhere) or one of TRL's built-in names. ``--model`` and ``--dataset`` are deprecated spellings of
``--model_name_or_path`` and ``--dataset_name``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, get_peft_config

from ..trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer
from ._args import parse_command
from ._common import load_any_dataset, load_for_training, train_and_save


@dataclass
class GRPOScriptArguments:
    """Script arguments of ``diffgr2 grpo`` (the model is ``ModelConfig``'s ``--model_name_or_path``, a converted
    block-diffusion directory or hub id).

    Parameters:
        dataset_name: dataset directory (``save_to_disk``) or data file with a ``prompt`` column.
        dataset_train_split: split to train on when the dataset has several (TRL's name; ``--dataset_split``:
            deprecated spelling).
        reward_funcs: reward functions as dotted import paths (or TRL built-in names).
        validity_func: optional dotted path of a validity function (TRL reward signature, falsy = invalid).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset directory or data file (prompt column)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Reward functions (dotted import paths)."})
    validity_func: str | None = field(default=None, metadata={"help": "Validity function (dotted import path)."})
    allow_other_data: bool = field(
        default=False,
        metadata={"help": "Use a model trained on other prepared data (other semantic IDs/tokenizer) anyway."},
    )


# TRL's built-in reward names, as ``trl grpo --reward_funcs`` accepts them. TRL builds this table inside its script's
# main() (nothing importable), so it is mirrored here; the overlong punishment is a factory, configured from the run's
# max_completion_length (TRL's script fixes 1280 tokens) with TRL's soft cache of 256.
TRL_REWARD_NAMES = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
                    "get_soft_overlong_punishment")


def resolve_function(path: str, max_completion_length: int | None = None) -> Callable:
    """Import ``pkg.module.fn``, or build one of TRL's built-in rewards by name, the way ``trl grpo --reward_funcs``
    does (the current directory is importable)."""
    from trl import rewards as trl_rewards

    if "." not in path:
        if path == "get_soft_overlong_punishment":
            length = max_completion_length or 1280
            return trl_rewards.get_soft_overlong_punishment(max_completion_len=length,
                                                            soft_punish_cache=min(256, length // 2))
        if path in TRL_REWARD_NAMES:
            return getattr(trl_rewards, path)
        raise ValueError(f"Could not load reward function {path!r}: expected a dotted import path "
                         "(e.g. diffgr2_trl.rewards.rerank.gr2_reward) or one of TRL's built-in names "
                         f"{list(TRL_REWARD_NAMES)}.")
    module_path, name = path.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_path)
    if not hasattr(module, name):
        raise ValueError(f"Module {module_path!r} has no function {name!r}.")
    return getattr(module, name)


def load_dataset_path(path: str, split: str = "train"):
    """A prompt dataset (see :func:`._common.load_any_dataset`) that has the ``prompt`` column GRPO needs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Dataset {path!r} not found.")
    ds = load_any_dataset(path, split)
    if "prompt" not in ds.column_names:
        raise ValueError(f"Dataset {path!r} has columns {ds.column_names}; GRPO needs a 'prompt' column.")
    return ds


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None):
    """``(GRPOScriptArguments, DiffusionGRPOConfig, ModelConfig)``; CPU training by default without CUDA."""
    return parse_command("grpo", (GRPOScriptArguments, DiffusionGRPOConfig, ModelConfig), argv, values, trainer=True)


def run(script_args: GRPOScriptArguments, training_args: DiffusionGRPOConfig, model_args: ModelConfig) -> None:
    """Train and save to ``training_args.output_dir``."""
    if not model_args.model_name_or_path or not script_args.dataset_name or not script_args.reward_funcs:
        raise SystemExit("diffgr2 grpo needs --model_name_or_path, --dataset_name and --reward_funcs.")
    reward_funcs = [resolve_function(p, training_args.max_completion_length) for p in script_args.reward_funcs]
    validity = resolve_function(script_args.validity_func) if script_args.validity_func else None
    from ..rerank.pipeline_data import check_model_data, record_training_data

    check_model_data(model_args.model_name_or_path, script_args.dataset_name, script_args.allow_other_data)
    model, tokenizer = load_for_training(model_args.model_name_or_path, model_args, training_args.trust_remote_code)
    trainer = DiffusionGRPOTrainer(
        model, reward_funcs=reward_funcs, args=training_args, processing_class=tokenizer,
        train_dataset=load_dataset_path(script_args.dataset_name, script_args.dataset_train_split),
        peft_config=get_peft_config(model_args), validity_fn=validity,
    )
    train_and_save(trainer, tokenizer, training_args.output_dir, training_args.resume_from_checkpoint)
    record_training_data(training_args.output_dir, script_args.dataset_name)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
