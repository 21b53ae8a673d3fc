"""Helpers shared by the ``diffgr2`` subcommands: loading datasets and training models (the model loader itself is
:func:`diffgr2_trl.modeling.load_model_and_tokenizer`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..modeling import check_local_model


def load_any_dataset(spec: str, split: str = "train", config: str | None = None):
    """A ``datasets.Dataset`` from a ``diffgr2 prepare`` output directory (its ``datasets/<split>``), a
    ``save_to_disk`` directory, a JSON/JSONL/Parquet/CSV file, or a hub name (``config``: the hub dataset's
    configuration, TRL's ``--dataset_config``; refused for local data, which has none)."""
    import datasets

    path = Path(spec)
    if config is not None:
        if path.exists():
            from ..errors import OptionError

            raise OptionError("dataset_config", f"names a configuration of a hub dataset, but {spec} is local data "
                              f"(it has none); got {config!r}.")
        return datasets.load_dataset(spec, name=config, split=split)
    if path.is_dir() and (path / "datasets" / split).is_dir():  # a `diffgr2 prepare` output directory
        return load_any_dataset(str(path / "datasets" / split), split)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if path.is_dir() and (path / split).is_dir():
        return load_any_dataset(str(path / split), split)
    suffix = path.suffix.lower()
    if path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if kind is None:
            raise ValueError(f"Unsupported dataset file {spec!r}; use .jsonl/.json/.parquet/.csv or a save_to_disk dir.")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split)
    return datasets.load_dataset(spec, split=split)


def load_script_datasets(command: str, script_args, training_args):
    """``(train, eval)`` for a trainer subcommand, honouring TRL's ``ScriptArguments`` as TRL's scripts do: the
    ``dataset_train_split``, and ``dataset_test_split`` as the eval dataset when ``eval_strategy`` is not ``"no"``
    (else ``None``), both of configuration ``dataset_config``. ``dataset_streaming`` is refused: the trainers check
    and prepare every row before training."""
    if script_args.dataset_streaming:
        from ..errors import OptionError

        raise OptionError("dataset_streaming", f"is not supported by diffgr2 {command}: the trainer checks every row "
                          "before training; load the dataset without streaming.")
    train = load_any_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    evaluation = None
    if training_args.eval_strategy != "no" and script_args.dataset_test_split:
        evaluation = load_any_dataset(script_args.dataset_name, script_args.dataset_test_split,
                                      script_args.dataset_config)
    return train, evaluation


def write_log_history(trainer, output_dir: str) -> None:
    """Save the trainer's log history (losses and metrics per logging step) as ``log_history.json``."""
    import json

    from ..utils import atomic_write_text

    atomic_write_text(Path(output_dir) / "log_history.json", json.dumps(trainer.state.log_history, indent=1))


def load_for_training(path: str, model_args, trust_remote_code: bool = False):
    """Model + tokenizer for a trainer subcommand, honouring TRL's ``ModelConfig`` (revision, dtype, attention,
    4/8-bit) and the training config's ``trust_remote_code`` (TRL 1.16 keeps that field there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import get_quantization_config

    check_local_model(path)

    # revision and trust_remote_code go to the model and the tokenizer alike, as TRL's scripts pass them
    hub: dict = {"revision": model_args.model_revision, "trust_remote_code": trust_remote_code}
    kwargs: dict = {"attn_implementation": model_args.attn_implementation or "sdpa", **hub}
    if model_args.dtype not in ("auto", None):
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path, **hub)


def train_and_save(trainer, tokenizer, output_dir: str, resume_from_checkpoint=None) -> None:
    """Train (resuming if asked), then save the model, tokenizer and log history to ``output_dir``.

    ``resume_from_checkpoint`` may be a checkpoint path, or ``"true"``/``"last"`` for the last one in ``output_dir``.
    """
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last"):
        resume_from_checkpoint = True
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        write_log_history(trainer, output_dir)
