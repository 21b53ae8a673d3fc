"""Fast ``diffgr2 CMD --help`` and up-front argument checks, from a snapshot of every subcommand's parser.

Why: the trainer subcommands' options are TRL's config dataclasses, and importing them (TRL,
``transformers.TrainingArguments``, torch) takes 5-15 s on a small CPU. A user asking for ``--help``, mistyping an
option or a value, or pointing at a directory that does not exist should hear so in well under a second, not after
the imports (or a model load).

``cli_spec.json`` holds each subcommand's help text and options (flags, type, choices, nargs, required). It is written
by ``python scripts/cli_spec.py`` from the live parsers (:func:`build_spec`, :func:`~._args.capture_parsers`) and
``tests/test_cli_spec.py`` checks it against them, so it cannot drift silently. It is used only when the installed
TRL, transformers and diffgr2-trl versions are the ones it was built with; otherwise the CLI parses as it always
did (slower, equally exact). The checks here only reject what the real parser would reject too; anything they do not
understand (a positional argument, say) is left to it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import UserError

SPEC_PATH = Path(__file__).with_name("cli_spec.json")
HELP_COLUMNS = "100"  # the help text is rendered at this width, whatever the terminal
# Options whose value names a local file or directory when it looks like a path (a hub id such as "Qwen/Qwen3-0.6B"
# does not): a missing one is reported before anything is imported.
PATH_OPTIONS = ("model_name_or_path", "dataset_name", "data_dir", "teacher_model_name_or_path", "config")
CPU_NOTE = ("On a machine without a GPU (CUDA, XPU or MPS), --use_cpu defaults to true and --bf16 to false unless an option or "
            "--config sets either.")


def installed_versions() -> dict[str, str]:
    """Versions the snapshot depends on (cheap: package metadata, no import)."""
    from .. import __version__

    out = {"diffgr2_trl": __version__}
    for dist in ("trl", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _type_name(action) -> str | None:
    return getattr(action.type, "__name__", None) if action.type is not None else None


def build_spec(commands: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Snapshot every subcommand's parser: ``{"versions": ..., "commands": {name: {"help", "trainer", "options"}}}``.

    ``commands`` is the CLI's table (:data:`diffgr2_trl.cli.COMMANDS`), passed in so this module never imports the
    CLI or the pipeline.
    """
    from ._args import _Captured, capture_parsers

    snapshot: dict[str, Any] = {}
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        for name, (module, _) in commands.items():
            with capture_parsers() as captured:
                try:
                    importlib.import_module(module).parse([])
                except _Captured:
                    pass
            if len(captured) != 1:
                raise RuntimeError(f"diffgr2 {name}: parse([]) built {len(captured)} parsers, expected 1.")
            _, parser, trainer = captured[0]
            options = []
            for a in parser._actions:
                if not a.option_strings or a.dest == "help":
                    continue
                options.append({"dest": a.dest, "flags": list(a.option_strings), "type": _type_name(a),
                                "choices": [str(c) for c in a.choices] if a.choices else None,
                                "nargs": a.nargs, "required": bool(a.required)})
            snapshot[name] = {"help": parser.format_help(), "trainer": trainer, "options": options}
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return {"versions": installed_versions(), "commands": snapshot}


def write_spec(commands: Mapping[str, tuple[str, str]], path: Path = SPEC_PATH) -> Path:
    from ..utils import atomic_write_text

    atomic_write_text(path, json.dumps(build_spec(commands), indent=1, sort_keys=True) + "\n")
    return path


@functools.cache
def load_spec() -> dict[str, Any] | None:
    """The snapshot when it matches the installed versions, else ``None`` (the CLI then parses the slow way)."""
    if os.environ.get("DIFFGR2_NO_CLI_SPEC") or not SPEC_PATH.is_file():
        return None
    spec = json.loads(SPEC_PATH.read_text())
    return spec if spec.get("versions") == installed_versions() else None


def _to_bool(v: str) -> bool:
    low = v.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(v)


_CONVERT = {"int": int, "float": float, "str": str, "string_to_bool": _to_bool}
_EXPECTED = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}


def _looks_local(value: str) -> bool:
    if value.startswith(("/", "./", "../", "~")) or value in (".", ".."):
        return True
    first = value.split("/", 1)[0]
    return "/" in value and Path(first).is_dir()  # runs/cpu/model where runs/ exists here


def _check_value(flag: str, option: dict, value: str) -> None:
    kind = option["type"]
    convert = _CONVERT.get(kind)
    if convert is not None:
        try:
            convert(value)
        except ValueError:
            raise UserError(f"{flag} {value!r}: expected {_EXPECTED.get(kind, kind)}.") from None
    if option["choices"] and value not in option["choices"]:
        raise UserError(f"{flag} {value!r}: expected one of {', '.join(option['choices'])}.")
    if option["dest"] in PATH_OPTIONS and _looks_local(value) and not Path(value).expanduser().exists():
        raise UserError(f"{flag} {value}: no such file or directory.")


def _find(flag: str, by_flag: dict[str, dict], renames: dict[str, str]) -> dict | None:
    key = flag[2:].replace("-", "_")
    if f"--{renames.get(key, key)}" in by_flag:
        return by_flag[f"--{renames.get(key, key)}"]
    if flag in by_flag:
        return by_flag[flag]
    prefixed = {id(o): o for f, o in by_flag.items() if f.startswith(flag)}  # argparse accepts unique prefixes
    return next(iter(prefixed.values())) if len(prefixed) == 1 else None


def precheck(command: str, argv: list[str]) -> bool:
    """Answer ``--help`` from the snapshot (returns ``True``: done), or raise :class:`UserError` for an unknown option,
    a value its parser would reject, a missing local path or a missing required option; ``False``: go on and parse.

    Does nothing (returns ``False``) without a snapshot matching the installed versions.
    """
    spec = load_spec()
    entry = (spec or {}).get("commands", {}).get(command)
    if entry is None:
        return False
    if "-h" in argv or "--help" in argv:
        text = entry["help"] + (f"\n{CPU_NOTE}\n" if entry["trainer"] else "")
        sys.stdout.write(text)
        return True
    from ._args import DEPRECATED_OPTIONS

    renames = DEPRECATED_OPTIONS.get(command, {})
    by_flag = {f: o for o in entry["options"] for f in o["flags"]}
    by_flag["--config"] = {"dest": "config", "flags": ["--config"], "type": "str", "choices": None, "nargs": None,
                           "required": False}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            return False  # not an option: the real parser decides
        flag, eq, inline = token.partition("=")
        option = _find(flag, by_flag, renames)
        if option is None:
            # Compare the bare names: the shared "--" prefix alone made unrelated options look alike
            # (--threads -> --reward_funcs).
            bare = {f[2:].replace("-", "_"): f for f in sorted(by_flag) if f.startswith("--")}
            near = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), list(bare), n=1)
            raise UserError(f"unrecognized option {flag}" + (f"; did you mean {bare[near[0]]}?" if near else "")
                            + f" (diffgr2 {command} --help lists them).")
        given.add(option["dest"])
        values = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        nargs = option["nargs"]
        if nargs is None and len(values) != 1:
            if not values:
                raise UserError(f"{flag}: expected one value.")
            return False  # e.g. a value that starts with "--": the real parser decides
        if nargs == "?" and len(values) > 1:
            return False
        if nargs == "+" and not values:
            raise UserError(f"{flag}: expected at least one value.")
        for value in values:
            _check_value(flag, option, value)
    if "config" not in given and "preset" not in given:
        missing = [o["flags"][0] for o in entry["options"] if o["required"] and o["dest"] not in given]
        if missing:
            raise UserError(f"missing required option(s): {', '.join(missing)} (diffgr2 {command} --help).")
    return False
