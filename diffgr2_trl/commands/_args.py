"""How every ``diffgr2`` subcommand turns options into its argument dataclasses: one function, :func:`parse_command`.

The same function serves the command line (``argv``, ``--config file.yaml``) and the Python API (``values``, a mapping
of option names to values, as :mod:`diffgr2_trl.pipeline` passes them), so a stage of the pipeline and the command a
user types parse identically, with TRL's :class:`~trl.TrlParser`.

Conventions shared by all subcommands (TRL's script names): ``--model_name_or_path``, ``--dataset_name``,
``--output_dir``. The older spellings in :data:`DEPRECATED_OPTIONS` are still accepted for one release, on the command
line and as ``--config`` keys, with a ``FutureWarning`` naming the new one. ``--threads`` means torch's intra-op CPU
threads everywhere (:func:`diffgr2_trl.utils.set_threads`): a command whose dataclasses have no ``threads`` field gets
it from :class:`SharedOptions`, applied as its options are parsed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# command -> {deprecated option: its new name}; accepted for one release.
DEPRECATED_OPTIONS: dict[str, dict[str, str]] = {
    "prepare": {"out": "output_dir"},
    "train-ar": {"prepared": "dataset_name", "out": "output_dir"},
    "evaluate": {"model": "model_name_or_path", "prepared": "dataset_name", "max_new_tokens": "max_completion_length"},
    "generate": {"model": "model_name_or_path", "max_new_tokens": "max_completion_length"},
    "convert": {"model": "model_name_or_path", "output": "output_dir"},
    # one teacher flag on the command line: --teacher (the config field teacher_model, TRL's unused
    # teacher_model_name_or_path)
    "opd": {"model": "model_name_or_path", "dataset": "dataset_name", "teacher_model": "teacher",
            "teacher_model_name_or_path": "teacher", "dataset_split": "dataset_train_split",
            "eval_split": "dataset_test_split"},
    "grpo": {"model": "model_name_or_path", "dataset": "dataset_name", "dataset_split": "dataset_train_split"},
    "bench-decode": {"model": "model_name_or_path"},
    "bench-rl": {"model": "model_name_or_path"},
    "serve-teacher": {"model": "model_name_or_path"},
    "pipeline": {"out": "output_dir"},
}


@dataclass
class SharedOptions:
    """Options every subcommand takes, added to the parser of a command whose own dataclasses lack them.

    Parameters:
        threads (`int`, *optional*, defaults to `0`):
            torch intra-op CPU threads (0: torch's default), set by :func:`parse_command` once the options are
            parsed, before the command's ``run`` loads anything.
    """

    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})


def _shared_types(dataclass_types: tuple[type, ...]) -> tuple[type, ...]:
    """``(SharedOptions,)`` when none of the command's dataclasses declares the shared options, else ``()``."""
    own = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    shared = {f.name for f in dataclasses.fields(SharedOptions)}
    if own & shared and not shared <= own:
        raise TypeError(f"{dataclass_types} declare part of {sorted(shared)}: declare all or none of them.")
    return () if shared <= own else (SharedOptions,)


def _warn(command: str, old: str, new: str) -> None:
    warnings.warn(f"diffgr2 {command}: --{old} is deprecated; use --{new} (the old spelling goes in the next release).",
                  FutureWarning, stacklevel=4)


def rename_deprecated_argv(command: str, argv: Iterable[str]) -> list[str]:
    """``argv`` with deprecated option names replaced by their new names (``--old V`` and ``--old=V``), warning once
    per name. Dash spellings (``--max-new-tokens``) count too."""
    renames = DEPRECATED_OPTIONS.get(command, {})
    out = []
    for a in argv:
        if a.startswith("--"):
            flag, eq, value = a[2:].partition("=")
            key = flag.replace("-", "_")
            if key in renames:
                _warn(command, flag, renames[key])
                a = f"--{renames[key]}{eq}{value}"
        out.append(a)
    return out


def rename_deprecated_keys(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a ``--config`` mapping or API options) with deprecated keys renamed; a new key given too wins."""
    renames = DEPRECATED_OPTIONS.get(command, {})
    out = dict(values)
    for old, new in renames.items():
        if old in out:
            _warn(command, old, new)
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name V`` / ``--name=V`` from ``argv`` and return ``V`` (the last one given)."""
    value = None
    i = 0
    while i < len(argv):
        if argv[i] == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
        elif argv[i].startswith(f"--{name}="):
            value = argv.pop(i).split("=", 1)[1]
        else:
            i += 1
    return value


def _peek_option(argv: list[str], name: str) -> str | None:
    return _pop_option(list(argv), name)


def _read_config(path: str) -> dict[str, Any]:
    """A ``--config`` YAML mapping; its ``env`` section is exported to the environment (as TRL does)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path} must contain a YAML mapping.")
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise ValueError("`env` field should be a dict in the YAML file.")
    for key, value in env.items():
        os.environ[key] = str(value)
    return config


def _cpu_defaults(values: dict[str, Any], argv: list[str]) -> None:
    """On a CPU-only machine (no CUDA, XPU or MPS device), default to ``use_cpu=True, bf16=False`` unless the options
    set either: TRL's bf16 default would otherwise stop a trainer before any other check, with advice a CLI user
    cannot follow."""
    from ..utils import accelerator_type

    if accelerator_type() is not None:
        return
    keys = set(values) | {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if not keys & {"use_cpu", "bf16", "fp16"}:
        values.update(use_cpu=True, bf16=False)


class _Captured(Exception):
    """Raised by :func:`parse_command` inside :func:`capture_parsers`, once the parser is built."""


_CAPTURE: list | None = None


@contextlib.contextmanager
def capture_parsers():
    """Within this block, :func:`parse_command` builds its parser, appends ``(command, parser, trainer)`` to the
    yielded list and raises ``_Captured`` instead of parsing: how :mod:`._spec` snapshots every subcommand's options
    (machine-dependent defaults, such as CPU training where there is no CUDA, are left out)."""
    global _CAPTURE
    previous, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = previous


def parse_command(
    command: str,
    dataclass_types: tuple[type, ...],
    argv: Iterable[str] | None = None,
    values: Mapping[str, Any] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    preset_kind: str | None = None,
    trainer: bool = False,
) -> tuple:
    """Parse a subcommand's options into its dataclasses with :class:`trl.TrlParser`.

    Precedence, lowest first: ``defaults`` (the command's own, where they differ from a shared dataclass's), the
    preset named by ``--preset`` (when ``preset_kind`` is given: ``presets/{preset_kind}_{NAME}.yaml``), the
    ``--config`` file, ``values``, then the command line ``argv``.

    Args:
        command: the subcommand's name (for deprecated spellings and messages).
        trainer: a TRL-trainer command: on a machine without CUDA, ``use_cpu``/``bf16`` default to CPU training.
    """
    from trl import TrlParser

    argv = rename_deprecated_argv(command, argv or [])
    config_path = _pop_option(argv, "config")
    config = rename_deprecated_keys(command, _read_config(config_path)) if config_path else {}
    values = rename_deprecated_keys(command, values or {})
    merged: dict[str, Any] = dict(defaults or {})
    if preset_kind is not None:
        name = _peek_option(argv, "preset") or values.get("preset") or config.get("preset")
        if name:
            from ..presets import load_preset_file

            merged.update(load_preset_file(preset_kind, name))
            merged["preset"] = name
    merged.update(config)
    merged.update(values)
    if trainer and _CAPTURE is None:
        _cpu_defaults(merged, argv)
    shared = _shared_types(tuple(dataclass_types))
    parser = TrlParser((*dataclass_types, *shared), prog=f"diffgr2 {command}")
    if _CAPTURE is not None:
        parser.set_defaults_with_config(**merged)
        _CAPTURE.append((command, parser, trainer))
        raise _Captured(command)
    unknown = parser.set_defaults_with_config(**merged)
    if unknown:
        where = f"config file {config_path}" if config_path else "options"
        raise ValueError(f"Unknown arguments from {where}: {unknown}. Please remove them.")
    from ..errors import OptionError, UserError

    try:
        parsed = tuple(parser.parse_args_into_dataclasses(args=argv))
    except OptionError as e:  # a dataclass's own check names its field: spell it as the command line does
        raise UserError(f"--{e.option} {e.detail}") from e
    if shared:  # the command's run() takes its own dataclasses only: apply the shared options here
        from ..utils import set_threads

        set_threads(parsed[-1].threads)
        parsed = parsed[:-1]
    return parsed
