"""Check a pipeline configuration in full before anything runs: every key of every stage section must be an option
of the subcommand that section feeds, and every value must parse as that option's type (with the parser the stage
will use), so a misspelling or a wrong value fails in a second, not half an hour into the run."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
from typing import Any

from ..commands._args import DEPRECATED_OPTIONS
from ..errors import UserError
from .stages import SECTIONS

# The sections and their subcommands live in the stage table (stages.SECTIONS); these views are derived from it.
SECTION_ARGUMENTS: dict[str, tuple[str, ...]] = {name: sec.arguments for name, sec in SECTIONS.items()}
SECTION_COMMANDS: dict[str, str] = {name: sec.command for name, sec in SECTIONS.items()}
# subcommand -> a preset section whose argument classes it parses (for checking its --config files)
COMMAND_SECTIONS: dict[str, str] = {}
for _name, _sec in SECTIONS.items():
    COMMAND_SECTIONS.setdefault(_sec.command, _name)
# Acceptance targets the report checks (a preset's `targets` section overrides them; null leaves one out).
DEFAULT_TARGETS = {"teacher_valid": 0.99, "teacher_gain_points": None, "teacher_r1_ci_lo_points": -1.0,
                   "teacher_r3_gain_points": 1.0, "cft_valid": 0.95, "cft_tokens_per_forward": 2.0,
                   "final_vs_teacher": 0.98, "final_valid": 0.99, "naive_valid_max": 0.05, "speedup": 1.5,
                   "constrained_valid": 1.0, "constrained_overhead": 1.10, "constrained_r1_drop_points": 0.5,
                   "teacher_minutes": None, "total_minutes": None, "teacher_r1_min_gain_points": 0.0,
                   "teacher_r3_ci_lo_points": None, "teacher_copy_rate_max": 0.95, "reference_r1_gain_points": None,
                   "final_r3_vs_teacher": None, "final_top1_agreement": None, "opd_agreement_ci_lo_points": None}
# keys read by the pipeline itself rather than passed to a subcommand
PIPELINE_KEYS: dict[str, set[str]] = {name: set(sec.pipeline_keys) for name, sec in SECTIONS.items() if sec.pipeline_keys}


def _section_keys(section: str) -> set[str]:
    """Valid keys of a preset section: its subcommand's options, their deprecated spellings (renamed with a
    ``FutureWarning`` when parsed) and the keys the pipeline reads itself."""
    if section == "targets":
        return set(DEFAULT_TARGETS)
    keys = set(PIPELINE_KEYS.get(section, set())) | set(DEPRECATED_OPTIONS.get(SECTION_COMMANDS[section], {}))
    for spec in SECTION_ARGUMENTS[section]:
        module, name = spec.split(":")
        keys |= {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    return keys


@functools.cache
def _section_actions(section: str) -> dict[str, argparse.Action]:
    """Option name -> the argparse action that parses it, from the ``TrlParser`` the section's subcommand builds."""
    from trl import TrlParser

    types = tuple(getattr(importlib.import_module(spec.split(":")[0]), spec.split(":")[1])
                  for spec in SECTION_ARGUMENTS[section])
    parser = TrlParser(types)
    return {a.dest: a for a in parser._actions if a.option_strings}


def _type_name(action: argparse.Action) -> str:
    kind = getattr(action.type, "__name__", None) or "a value"
    kind = {"string_to_bool": "a boolean (true or false)", "float": "a number", "int": "an integer",
            "str": "a string"}.get(kind, kind)
    if action.choices:
        kind = "one of " + ", ".join(map(str, action.choices))
    return kind


def value_problem(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` (from YAML or Python) would not parse for ``action``, or ``None`` when it would.

    A string goes through the option's own type, as argparse converts a string default; other scalars must already
    be of that type (an integer counts as a number); a list is checked element by element where the option takes
    several values. ``None`` is left to the stage (an optional field's default).
    """
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, (list, tuple)):
        if not many:  # a field typed `str | list[str]` (TRL's report_to) takes a list from YAML as it is
            return None
        for item in value:
            problem = value_problem(argparse.Action(action.option_strings, action.dest, type=action.type,
                                                    choices=action.choices), item)
            if problem:
                return problem
        return None
    kind = getattr(action.type, "__name__", None)
    if isinstance(value, dict):  # a mapping can be a value of a dict-typed option, never of a scalar one
        return f"expected {_type_name(action)}, got a mapping" if kind in ("float", "int", "string_to_bool") else None
    converted = value
    if isinstance(value, str) and action.type is not None:
        try:
            converted = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return f"expected {_type_name(action)}"
    elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"expected {_type_name(action)}"
    elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"expected {_type_name(action)}"
    elif kind == "string_to_bool" and not isinstance(value, bool):
        return f"expected {_type_name(action)}"
    if action.choices and converted not in action.choices and str(converted) not in map(str, action.choices):
        return f"expected {_type_name(action)}"
    return None


def _bad_values(section: str, values: dict, describe) -> list[str]:
    """One message per value of ``values`` that its option's parser would reject (unknown keys are skipped)."""
    actions = _section_actions(section)
    problems = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            continue
        problem = value_problem(action, value)
        if problem:
            problems.append(f"{describe(key)} = {value!r}: {problem}")
    return problems


def _check_pipeline_keys(section: str, values: dict) -> list[str]:
    """The keys the pipeline reads itself: ``taus`` (a list of numbers in (0, 1]), ``batch_sizes`` (a list of positive
    integers), ``compiled_ar`` (a boolean); and ``workers``, an evaluate option the decode stage refuses (it
    measures speed in one process)."""
    problems = []
    taus = values.get("taus")
    if taus is not None and (not isinstance(taus, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in taus)):
        problems.append(f"{section}.taus = {taus!r}: expected a list of numbers in (0, 1]")
    sizes = values.get("batch_sizes")
    if sizes is not None and (not isinstance(sizes, list) or not sizes or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)):
        problems.append(f"{section}.batch_sizes = {sizes!r}: expected a list of positive integers")
    if "compiled_ar" in values and not isinstance(values["compiled_ar"], bool):
        problems.append(f"{section}.compiled_ar = {values['compiled_ar']!r}: expected a boolean (true or false)")
    if section == "decode" and values.get("workers") not in (None, 1):
        problems.append(f"decode.workers = {values['workers']!r}: the decode stage times every decoder in one "
                        "process, side by side; workers belongs to the evaluate section")
    return problems


def _check_targets(values: dict) -> list[str]:
    return [f"targets.{k} = {v!r}: expected a number or null" for k, v in values.items()
            if k in DEFAULT_TARGETS and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]


def _unknown_keys(values: dict, keys: set[str], describe) -> list[str]:
    """One message per key of ``values`` not in ``keys``, with the closest valid key when there is one."""
    problems = []
    for key in values:
        if key not in keys:
            near = difflib.get_close_matches(key, sorted(keys), n=1)
            problems.append(describe(key) + (f"; did you mean {near[0]!r}?" if near else ""))
    return problems


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
        if section == "evaluate" and "parallel_passes" in values:
            problems.append("evaluate.parallel_passes was replaced by evaluate.workers (every pass decodes in that "
                            "many processes; the AR teacher's constrained pass reuses its valid unconstrained rows)")
            values = {k: v for k, v in values.items() if k != "parallel_passes"}
        problems += _unknown_keys(values, _section_keys(section), lambda key, s=section: f"{s}.{key} is not an option")
        if section == "targets":
            problems += _check_targets(values)
        else:
            problems += _bad_values(section, values, lambda key, s=section: f"{s}.{key}")
            problems += _check_pipeline_keys(section, values)
    _raise(source, problems)


def _raise(source: str, problems: list[str]) -> None:
    """One :class:`UserError` listing every problem, one per line, each prefixed by where it comes from."""
    if len(problems) == 1:
        raise UserError(f"{source}: {problems[0]}.")
    if problems:
        raise UserError(f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {source}: {p}." for p in problems))


def validate_config_file(command: str, path: str) -> None:
    """Check a subcommand's ``--config`` file key by key (closest valid key named), before the command runs."""
    import yaml

    section = COMMAND_SECTIONS.get(command)
    if section is None:
        return  # other subcommands: TrlParser's own check
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({e}).") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of options, got {type(values).__name__}.")
    keys = _section_keys(section) - PIPELINE_KEYS.get(section, set())
    if command == "train-ar":
        keys.add("preset")
    problems = _unknown_keys(values, keys, lambda key: f"{key} is not an option of diffgr2 {command}")
    problems += _bad_values(section, values, str)
    _raise(f"--config {path}", problems)
