"""The ``diffgr2`` console script: one subcommand per module in :mod:`diffgr2_trl.commands`.

Every subcommand module exposes the same three functions:

- ``parse(argv=None, values=None)``: its argument dataclasses, parsed with TRL's ``TrlParser`` by
  :func:`diffgr2_trl.commands._args.parse_command` (``--config file.yaml`` everywhere; the shared option names
  ``--model_name_or_path`` / ``--dataset_name`` / ``--output_dir``, older spellings deprecated; ``--threads`` =
  torch intra-op CPU threads);
- ``run(*parsed)``: the work, callable from Python (the pipeline calls it for each stage);
- ``main(argv) -> int``: ``run(*parse(argv))``, what ``diffgr2 <command>`` calls.

Modules are imported lazily so ``diffgr2 --help`` stays fast and a subcommand's heavy dependencies (vLLM, say) are only
needed when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import UserError

# name -> (module, one-line help), in the order `diffgr2 --help` lists them. Kept here, not in `commands`: the
# table names `diffgr2_trl.pipeline.command`, and `commands` stays free of any reference to the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("diffgr2_trl.commands.prepare", "Re-ranking data: candidates, semantic IDs, prompt/completion datasets, tokenizer."),
    "train-ar": ("diffgr2_trl.commands.train_ar", "Train the AR GR2 re-ranker with TRL (SFT, then GRPO/DAPO)."),
    "evaluate": ("diffgr2_trl.commands.evaluate", "Decode a split and report R@k/N@k, validity and tokens/s."),
    "convert": ("diffgr2_trl.commands.convert", "Convert an HF causal LM into a block-diffusion LM."),
    "cft": ("diffgr2_trl.commands.cft", "Conversion fine-tuning (masked block-diffusion objective)."),
    "generate": ("diffgr2_trl.commands.generate", "Decode a prompt with the block-diffusion sampler."),
    "bench-decode": ("diffgr2_trl.commands.bench_decode", "Block sampler vs AR generate, side by side."),
    "bench-train": ("diffgr2_trl.commands.bench_train", "CFT step time vs plain SFT step time."),
    "bench-copy": ("diffgr2_trl.commands.bench_copy", "Copy learning as a curve: held-out exact/valid vs lists and minutes."),
    "serve-teacher": ("diffgr2_trl.commands.serve_teacher", "Serve an AR teacher with vLLM's OpenAI server, set up for scoring."),
    "bench-teacher": ("diffgr2_trl.commands.bench_teacher", "Teacher scoring tokens/s: HF in-process vs vLLM server vs vLLM in-process."),
    "opd": ("diffgr2_trl.commands.opd", "On-policy distillation of a block-diffusion student from an AR teacher."),
    "bench-opd": ("diffgr2_trl.commands.bench_opd", "OPD step time: rollout / teacher / student forward-backward shares."),
    "grpo": ("diffgr2_trl.commands.grpo", "Diffusion GRPO/DAPO: block-sampler rollouts, trajectory-replay likelihood."),
    "bench-rl": ("diffgr2_trl.commands.bench_rl", "RL step time (rollout / likelihood / update) per estimator vs TRL AR GRPO."),
    "bench-memory": ("diffgr2_trl.commands.bench_memory", "Peak memory of one OPD and one GRPO step vs vocabulary size and completion length."),
    "pipeline": ("diffgr2_trl.pipeline.command", "The whole recipe on the Amazon data it finds (--data_dir, or the shared data by default), resumable, with a report."),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: diffgr2 <command> [--config file.yaml] [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `diffgr2 <command> --help` for a command's options. Anywhere on the command line, --debug shows "
              "tracebacks and --verbose the libraries' progress bars."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffgr2: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    from .commands._spec import precheck

    if precheck(name, rest):  # --help answered from the parsers' snapshot; bad options fail here, before imports
        return 0
    config = _config_path(rest)
    if config is not None:
        from .pipeline.validate import validate_config_file

        validate_config_file(name, config)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def _config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


# Errors that come from what the user passed (paths, values, files), reported in one line by the console script.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError)


# Environment switches of the libraries' own progress bars (read when they are imported, hence set before that).
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_library_progress_bars() -> None:
    """Turn off datasets/transformers/hub progress bars for this process, unless the user set those switches."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def console_main(argv: list[str] | None = None) -> int:
    """The ``diffgr2`` console script: :func:`main`, with user errors printed as one line instead of a traceback.

    ``--debug`` (anywhere on the command line) or ``DIFFGR2_DEBUG=1`` shows the full traceback instead.
    Library progress bars (dataset saving and mapping, weight loading, downloads) are off unless ``--verbose``
    (anywhere on the command line) or the user set the libraries' own switches; the bars of the work a subcommand
    is there to do (training, decoding) always show.
    """
    from ._warnings import filter_known_warnings

    filter_known_warnings()  # the CLI's own output: known-harmless third-party notices dropped (see _warnings)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DIFFGR2_DEBUG", "") not in ("", "0")
    verbose = "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    if not verbose:
        quiet_library_progress_bars()
    if debug:
        return main(argv)
    try:
        return main(argv)
    except USER_ERRORS as e:
        cmd = argv[0] if argv else ""
        msg = str(e).strip() or type(e).__name__
        print(f"diffgr2 {cmd}: error: {msg}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the pipeline's says what was saved and how to resume)
        cmd = argv[0] if argv else ""
        print(f"\ndiffgr2 {cmd}: {str(e).strip() or 'interrupted.'}", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse and explicit exits already print their message
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(console_main())
