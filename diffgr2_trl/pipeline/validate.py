"""Check a pipeline configuration in full before anything runs: every key of every stage section must be an option
of the subcommand that section feeds, so a misspelling fails in a second, not half an hour into the run."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from ..errors import UserError

# preset section -> the argument dataclasses of the subcommand it configures ("module:Class")
SECTION_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "prepare": ("diffgr2_trl.commands.prepare:PrepareArguments",),
    "ar_mid": ("diffgr2_trl.rerank.ar:ARTrainArguments",),
    "ar_sft": ("diffgr2_trl.rerank.ar:ARTrainArguments",),
    "ar_rl": ("diffgr2_trl.rerank.ar:ARTrainArguments",),
    "convert": ("diffgr2_trl.commands.convert:ConvertArguments",),
    "cft": ("trl:ScriptArguments", "diffgr2_trl.trainers:BlockDiffusionConfig", "trl:ModelConfig"),
    "opd": ("diffgr2_trl.commands.opd:OPDScriptArguments", "diffgr2_trl.trainers:OnPolicyDistillationConfig",
            "trl:ModelConfig"),
    "rl": ("diffgr2_trl.commands.grpo:GRPOScriptArguments", "diffgr2_trl.trainers:DiffusionGRPOConfig",
           "trl:ModelConfig"),
    "evaluate": ("diffgr2_trl.commands.evaluate:EvaluateArguments",),
    "decode": ("diffgr2_trl.commands.evaluate:EvaluateArguments",),
}
# keys read by the pipeline itself rather than passed to a subcommand
PIPELINE_KEYS: dict[str, set[str]] = {"decode": {"taus"}, "evaluate": {"taus"}}


def _section_keys(section: str) -> set[str]:
    if section == "targets":
        from .report import DEFAULT_TARGETS

        return set(DEFAULT_TARGETS)
    keys = set(PIPELINE_KEYS.get(section, set()))
    for spec in SECTION_ARGUMENTS[section]:
        module, name = spec.split(":")
        keys |= {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    return keys


def validate_preset(preset: dict[str, Any], source: str) -> None:
    """Raise :class:`UserError` naming every unknown section or key of ``preset`` (with the closest valid key)."""
    known_sections = [*SECTION_ARGUMENTS, "targets"]
    problems = []
    for section, values in preset.items():
        if section not in known_sections:
            near = difflib.get_close_matches(section, known_sections, n=1)
            problems.append(f"unknown section {section!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of options, got {type(values).__name__}")
            continue
        keys = _section_keys(section)
        for key in values:
            if key not in keys:
                near = difflib.get_close_matches(key, sorted(keys), n=1)
                problems.append(f"{section}.{key} is not an option" + (f"; did you mean {near[0]!r}?" if near else ""))
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems) + ".")
