"""The CLI's parser snapshot (diffgr2_trl/commands/cli_spec.json): current, used for --help and up-front checks,
never stricter than the real parsers, and free of heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffgr2_trl.cli import COMMANDS
from diffgr2_trl.commands import _spec
from diffgr2_trl.errors import UserError


def test_the_snapshot_matches_the_live_parsers():
    stored = json.loads(_spec.SPEC_PATH.read_text())
    current = json.loads(json.dumps(_spec.build_spec(COMMANDS), sort_keys=True))
    assert stored["versions"] == current["versions"], (
        "cli_spec.json was built with other versions; run python scripts/cli_spec.py")
    assert set(stored["commands"]) == set(COMMANDS)
    for name in COMMANDS:
        assert stored["commands"][name] == current["commands"][name], (
            f"diffgr2 {name}: its options changed; run python scripts/cli_spec.py")


def test_help_and_bad_arguments_are_answered_without_heavy_imports(tmp_path):
    """--help of every subcommand, an unknown option, a bad value and a missing directory: no torch, transformers or
    TRL import (these take 5-15 s on 2 cores), so the answer comes in well under a second."""
    code = f"""
import contextlib, io, sys
from diffgr2_trl.cli import COMMANDS, console_main
for name in COMMANDS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert console_main([name, "--help"]) == 0, name
    assert out.getvalue().startswith("usage: diffgr2 " + name), name
err = io.StringIO()
with contextlib.redirect_stderr(err):
    assert console_main(["cft", "--learning_rate", "fast"]) == 2
    assert console_main(["evaluate", "--model_name_or_path", "{tmp_path}/missing", "--dataset_name", "{tmp_path}"]) == 2
    assert console_main(["convert", "--block_sizee", "8"]) == 2
    assert console_main(["evaluate", "--split", "tst"]) == 2
heavy = sorted(m for m in ("torch", "transformers", "trl", "datasets") if m in sys.modules)
print("HEAVY", heavy)
print(err.getvalue())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "diffgr2 cft: error: --learning_rate 'fast': expected a number." in out.stdout
    assert f"--model_name_or_path {tmp_path}/missing: no such file or directory." in out.stdout
    assert "unrecognized option --block_sizee; did you mean --block_size?" in out.stdout
    assert "--split 'tst': expected one of train, valid, test." in out.stdout


@pytest.mark.parametrize("argv", [
    ["evaluate", "--model_name_or_path", "Qwen/Qwen3-0.6B", "--dataset_name", ".", "--constrained", "--limit", "5"],
    ["evaluate", "--model", ".", "--prepared", ".", "--decoder", "block", "--tau", "0.9", "--constrained", "true"],
    ["bench-decode", "--batch_sizes", "1", "16", "--block_sizes", "8", "32", "--taus", "0.9", "--threads", "2"],
    ["convert", "--model_name_or_path", ".", "--output_dir", "x", "--block-size", "8"],
    ["cft", "--config", __file__],
    ["train-ar", "--preset", "cpu", "--dataset_name", ".", "--output_dir", "x"],
    ["pipeline", "--preset", "smoke", "--stages", "prepare", "cft", "--output_dir=runs/x"],
    ["grpo", "--learning_rate", "-1e-5", "--max_steps", "-1"],  # negative numbers are values, not options
    ["opd", "--lr_scheduler_type", "cosine", "--bf16", "false", "--use_cpu"],
])
def test_the_checks_accept_what_the_parsers_accept(argv):
    assert _spec.precheck(argv[0], argv[1:]) is False


@pytest.mark.parametrize("argv, message", [
    (["cft", "--max_steps", "2.5"], "--max_steps '2.5': expected an integer."),
    (["cft", "--bf16", "maybe"], "--bf16 'maybe': expected true or false."),
    (["cft", "--lr_scheduler_type", "cosinus"], "--lr_scheduler_type 'cosinus': expected one of linear, cosine"),
    (["cft", "--learning_rate"], "--learning_rate: expected one value."),
    (["pipeline", "--data_dir", "./no/such/dir"], "--data_dir ./no/such/dir: no such file or directory."),
    (["evaluate", "--dataset_name", "."], "missing required option(s): --model_name_or_path"),
    (["cft", "--config", "./missing.yaml"], "--config ./missing.yaml: no such file or directory."),
])
def test_the_checks_reject_what_the_parsers_reject(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _spec.precheck(argv[0], argv[1:])


def test_a_snapshot_from_other_versions_is_not_used(monkeypatch):
    monkeypatch.setattr(_spec, "installed_versions", lambda: {"diffgr2_trl": "0", "trl": "0", "transformers": "0"})
    _spec.load_spec.cache_clear()
    try:
        assert _spec.precheck("cft", ["--learning_rate", "fast"]) is False  # left to the real parser
    finally:
        _spec.load_spec.cache_clear()


def test_help_texts_read_correctly_and_threads_means_one_thing():
    """No option's help repeats a default ("(default: located automatically). (default: None)"); every --threads
    defaults to 0 (torch's default) and says so; boolean options of our own take the bare form (--flag) too."""
    import dataclasses
    import importlib
    import re

    stored = json.loads(_spec.SPEC_PATH.read_text())["commands"]
    for name, entry in stored.items():
        assert not re.search(r"\(default: [^)]*\)\.? *\(default:", entry["help"]), name
    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        for obj in vars(mod).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__:
                for f in dataclasses.fields(obj):
                    if f.name == "threads":
                        assert f.default == 0, f"{name}: --threads defaults to {f.default}"
                    # `bool | None` makes the parser demand a value (--use_cpu true); `bool` also takes --use_cpu
                    assert str(f.type).replace(" ", "") not in ("bool|None", "Optional[bool]"), f"{name}: {f.name}"


def test_an_unknown_option_is_matched_by_its_name_not_by_the_dashes(monkeypatch):
    spec = _spec.load_spec()
    assert spec is not None
    with pytest.raises(UserError, match=r"unrecognized option --treads; did you mean --threads\?"):
        _spec.precheck("grpo", ["--treads", "1"])
    # Without a --threads option, the shared "--" once made --reward_funcs the "closest" name.
    grpo = spec["commands"]["grpo"]
    grpo["options"] = [o for o in grpo["options"] if o["dest"] != "threads"]
    monkeypatch.setattr(_spec, "load_spec", lambda: spec)
    with pytest.raises(UserError, match="unrecognized option --threads") as e:
        _spec.precheck("grpo", ["--threads", "1"])
    assert "did you mean" not in str(e.value), e.value
