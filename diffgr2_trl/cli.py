"""The ``diffgr2`` console script: one subcommand per module in :mod:`diffgr2_trl.commands`.

Every subcommand module exposes ``main(argv: list[str]) -> int | None`` and parses its arguments with TRL's
``TrlParser`` so that ``--config file.yaml`` works everywhere. Modules are imported lazily so ``diffgr2 --help``
stays fast and a subcommand's heavy dependencies (vLLM, say) are only needed when it runs.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Later subcommands register here.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("diffgr2_trl.commands.prepare", "Re-ranking data: candidates, semantic IDs, prompt/completion datasets, tokenizer."),
    "train-ar": ("diffgr2_trl.commands.train_ar", "Train the AR GR2 re-ranker with TRL (SFT, then GRPO/DAPO)."),
    "evaluate": ("diffgr2_trl.commands.evaluate", "Decode a split and report R@k/N@k, validity and tokens/s."),
    "convert": ("diffgr2_trl.commands.convert", "Convert an HF causal LM into a block-diffusion LM."),
    "cft": ("diffgr2_trl.commands.cft", "Conversion fine-tuning (masked block-diffusion objective)."),
    "generate": ("diffgr2_trl.commands.generate", "Decode a prompt with the block-diffusion sampler."),
    "bench-decode": ("diffgr2_trl.commands.bench_decode", "Block sampler vs AR generate, side by side."),
    "bench-train": ("diffgr2_trl.commands.bench_train", "CFT step time vs plain SFT step time."),
    "serve-teacher": ("diffgr2_trl.commands.serve_teacher", "Serve an AR teacher with vLLM's OpenAI server, set up for scoring."),
    "bench-teacher": ("diffgr2_trl.commands.bench_teacher", "Teacher scoring tokens/s: HF in-process vs vLLM server vs vLLM in-process."),
    "opd": ("diffgr2_trl.commands.opd", "On-policy distillation of a block-diffusion student from an AR teacher."),
    "bench-opd": ("diffgr2_trl.commands.bench_opd", "OPD step time: rollout / teacher / student forward-backward shares."),
    "grpo": ("diffgr2_trl.commands.grpo", "Diffusion GRPO/DAPO: block-sampler rollouts, trajectory-replay likelihood."),
    "bench-rl": ("diffgr2_trl.commands.bench_rl", "RL step time (rollout / likelihood / update) per estimator vs TRL AR GRPO."),
    "pipeline": ("diffgr2_trl.commands.pipeline", "The whole recipe on Amazon Beauty, resumable, with a report."),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: diffgr2 <command> [--config file.yaml] [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `diffgr2 <command> --help` for a command's options."]
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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
