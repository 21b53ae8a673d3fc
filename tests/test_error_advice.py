"""Every flag and subcommand an error message suggests is one the CLI accepts (issue 20: advice that works)."""

from __future__ import annotations

import ast
import json
import re

from diffgr2_trl.cli import COMMANDS
from diffgr2_trl.commands._spec import SPEC_PATH
from tests.helpers import REPO

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")
# "diffgr2 CMD --flag ..." up to the end of the quoted command, clause or sentence
COMMAND = re.compile(r"\bdiffgr2 ([a-z][a-z-]*[a-z])\b([^`;()]*)")
# flags every subcommand takes outside its parser (cli.py and _args.py handle them)
GLOBAL_FLAGS = {"help", "debug", "verbose", "config"}
# flags of other programs that messages may name (vLLM's server, accelerate, pip)
OTHER_PROGRAMS = {"host", "port", "model", "num_processes", "no-deps", "index-url", "gpu-memory-utilization"}


def _message_text(node: ast.AST) -> str:
    """The literal text of every string (and f-string part) under ``node``."""
    parts = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            parts.append(sub.value)
    return " ".join(parts)


def _error_messages() -> list[tuple[str, str]]:
    """(file:line, text) of every ``raise``, ``warnings.warn`` and ``logger.warning`` message in the package."""
    out = []
    for path in sorted((REPO / "diffgr2_trl").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            is_warn = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and node.func.attr in ("warn", "warning"))
            if isinstance(node, ast.Raise) and node.exc is not None or is_warn:
                text = _message_text(node.exc if isinstance(node, ast.Raise) else node)
                if "--" in text or "diffgr2 " in text:
                    out.append((f"{path.relative_to(REPO)}:{node.lineno}", text))
    return out


def test_error_messages_only_suggest_flags_and_commands_that_exist():
    spec = json.loads(SPEC_PATH.read_text())["commands"]
    flags_of = {name: {f[2:].replace("-", "_") for o in entry["options"] for f in o["flags"]}
                for name, entry in spec.items()}
    every_flag = set().union(*flags_of.values()) | GLOBAL_FLAGS | {f.replace("-", "_") for f in OTHER_PROGRAMS}
    messages = _error_messages()
    assert len(messages) > 20  # the scan finds the messages at all
    problems = []
    for where, text in messages:
        for command, tail in COMMAND.findall(text):
            if command not in COMMANDS:
                problems.append(f"{where}: 'diffgr2 {command}' is not a subcommand")
                continue
            for flag in FLAG.findall(tail):  # a flag in a suggested command line must be that command's
                if flag.replace("-", "_") not in flags_of[command] | GLOBAL_FLAGS:
                    problems.append(f"{where}: --{flag} is not an option of diffgr2 {command}")
        for flag in FLAG.findall(text):  # any other flag named must exist somewhere
            if flag.replace("-", "_") not in every_flag:
                problems.append(f"{where}: --{flag} is not an option of any subcommand")
    assert not problems, "\n".join(problems)
