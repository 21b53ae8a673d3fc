"""The ``diffgr2`` subcommands, one module each (see :mod:`diffgr2_trl.cli`), registered in :data:`COMMANDS`.

Importing this package imports none of them: the table names modules, which the CLI imports when a subcommand runs.
"""

from __future__ import annotations

# name -> (module, one-line help), in the order `diffgr2 --help` lists them
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
    "pipeline": ("diffgr2_trl.pipeline.command", "The whole recipe on the Amazon data it finds (Beauty by default), resumable, with a report."),
}

__all__ = ["COMMANDS"]
