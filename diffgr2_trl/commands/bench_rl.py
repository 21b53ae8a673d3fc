"""``diffgr2 bench-rl``: one RL step broken into rollout / likelihood / update, per likelihood estimator, next to TRL's
AR ``GRPOTrainer`` on the same model and data, in one run.

    diffgr2 bench-rl [--model_name_or_path DIR] [--steps 5] [--batch_size 32] [--num_generations 8] [--json PATH]

Without ``--model_name_or_path`` (``--model``: deprecated spelling) a tiny Qwen3 is converted (block size 4) and CFT-trained on the synthetic sort task first, so the
block sampler decodes like a trained model. Timings are per optimizer step, averaged after one warm-up step:
``rollout`` is sampling, ``likelihood`` every log-prob forward (with gradient inside the loss, and without for old/ref
log-probs when those are needed), ``update`` the rest (backward, optimizer, rewards, bookkeeping). Forward passes are
per sample: for rollouts the forwards a sample took part in, for the likelihood the model calls (and in brackets the
noisy streams packed in them, each one completion long).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from ..utils import set_threads
from ._args import parse_command

ESTIMATOR_NAMES = ("trajectory_replay", "mean_field", "elbo")


class _StepClock(TrainerCallback):
    """Snapshot the trainer's cumulative rollout / likelihood seconds and the wall clock at every step end."""

    def __init__(self, trainer):
        self.trainer, self.marks = trainer, []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self.marks.append((time.perf_counter(), dict(self.trainer.timings)))

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), dict(self.trainer.timings)))


def _timed_ar_trainer_cls():
    """TRL's GRPOTrainer with the same rollout / likelihood clocks as the diffusion trainer."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.timings = {"rollout": 0.0, "likelihood": 0.0}

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            self.timings["rollout"] += time.perf_counter() - t0
            return out

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            self.timings["likelihood"] += time.perf_counter() - t0
            return out

    return TimedGRPOTrainer


def _summarise(name: str, trainer, clock: _StepClock, warmup: int) -> dict:
    marks = clock.marks[warmup:]
    steps = len(marks) - 1
    if steps < 1:
        raise RuntimeError("Need at least one timed step after warm-up: raise --steps.")
    (t0, a), (t1, b) = marks[0], marks[-1]
    total = (t1 - t0) / steps
    rollout = (b["rollout"] - a["rollout"]) / steps
    likelihood = (b["likelihood"] - a["likelihood"]) / steps
    logs = [h for h in trainer.state.log_history if "reward" in h][warmup:]

    def mean(key):
        values = [h[key] for h in logs if h.get(key) is not None]
        return statistics.mean(values) if values else None

    return {
        "trainer": name, "step_s": total, "rollout_s": rollout, "likelihood_s": likelihood,
        "update_s": total - rollout - likelihood,
        "rollout_forwards_per_sample": mean("rollout/forward_passes_per_sample") or mean("completions/mean_length"),
        "likelihood_forwards_per_sample": mean("likelihood/forward_passes_per_sample") or 1.0,
        "likelihood_streams_per_sample": mean("likelihood/streams_per_sample") or 0.0,
        "completion_length": mean("completions/mean_length"), "reward": mean("reward"),
    }


def run_bench(model_dir: str | None, steps: int = 5, batch_size: int = 32, num_generations: int = 8,
              elbo_samples: int = 4, threads: int | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from ..synthetic import sort_dataset, sort_reward
    from ..trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer

    set_threads(threads)
    tmp = tempfile.mkdtemp(prefix="diffgr2-bench-rl-")
    if model_dir is None:
        model_dir = _quick_sort_model(tmp)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = sort_dataset(max(256, batch_size * (steps + 2)), seed=1).remove_columns(["completion", "answer_start"])
    common = dict(use_cpu=True, bf16=False, max_steps=steps + 1, per_device_train_batch_size=batch_size,
                  num_generations=num_generations, max_completion_length=16, learning_rate=1e-5, logging_steps=1,
                  report_to=[], save_strategy="no", seed=0, disable_tqdm=True, temperature=1.0,
                  gradient_checkpointing=False)
    rows = []
    runs = [(f"diffusion ({e})", DiffusionGRPOTrainer, DiffusionGRPOConfig, {"likelihood_estimator": e,
             "elbo_samples": elbo_samples}) for e in ESTIMATOR_NAMES]
    runs.append(("TRL GRPOTrainer (AR)", _timed_ar_trainer_cls(), GRPOConfig, {}))
    for name, trainer_cls, config_cls, extra in runs:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        args = config_cls(f"{tmp}/{len(rows)}", **common, **extra)
        trainer = trainer_cls(model, reward_funcs=sort_reward, args=args, train_dataset=data, processing_class=tok)
        clock = _StepClock(trainer)
        trainer.add_callback(clock)
        trainer.train()
        rows.append(_summarise(name, trainer, clock, warmup=1))
    return {"model": model_dir, "steps_timed": steps, "batch_size": batch_size, "num_generations": num_generations,
            "elbo_samples": elbo_samples, "threads": torch.get_num_threads(), "rows": rows}


def _quick_sort_model(tmp: str) -> str:
    from ..block_diffusion import convert_to_block_diffusion
    from ..modeling import build_model
    from ..synthetic import sort_dataset, sort_tokenizer
    from ..trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    path = f"{tmp}/sort-cft"
    tok = sort_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32)
    model = build_model("qwen3", tokenizer=tok, shape=shape, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    args = BlockDiffusionConfig(f"{tmp}/cft", use_cpu=True, bf16=False, max_steps=120, per_device_train_batch_size=64,
                                learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=10, report_to=[],
                                save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1000)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(2000), processing_class=tok)
    trainer.train()
    trainer.save_model(path)
    tok.save_pretrained(path)
    return path


def format_table(result: dict) -> str:
    lines = [
        "| trainer | step s | rollout s | likelihood s | update s | rollout fwd/sample | likelihood fwd/sample "
        "(streams) | completion len | reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['trainer']} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {r['likelihood_s']:.3f} | "
            f"{r['update_s']:.3f} | {r['rollout_forwards_per_sample']:.1f} | "
            f"{r['likelihood_forwards_per_sample']:.0f} ({r['likelihood_streams_per_sample']:.0f}) | "
            f"{r['completion_length']:.1f} | {r['reward']:.3f} |"
        )
    return "\n".join(lines)


@dataclass
class BenchRLArguments:
    """Arguments of ``diffgr2 bench-rl``.

    Parameters:
        model_name_or_path: converted model directory; omitted: a quick CFT-trained sort model is built.
        steps: timed optimizer steps per trainer (after one warm-up step).
        batch_size / num_generations: completions per step and per prompt.
        elbo_samples: Monte-Carlo samples of the ``elbo`` estimator.
        threads: torch intra-op CPU threads (0 or unset: torch's default).
        json: also write the figures to this JSON file.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Converted model dir (None: a quickly CFT-trained sort model)."})
    steps: int = field(default=5, metadata={"help": "Timed optimizer steps per trainer (after 1 warm-up)."})
    batch_size: int = field(default=32, metadata={"help": "Completions per step."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt."})
    elbo_samples: int = field(default=4, metadata={"help": "Monte-Carlo samples of the elbo estimator."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    json: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchRLArguments]:
    return parse_command("bench-rl", (BenchRLArguments,), argv, values)


def run(args: BenchRLArguments) -> dict:
    """Run the benchmark; prints the table, writes ``args.json`` when set, returns the figures."""
    result = run_bench(args.model_name_or_path, args.steps, args.batch_size, args.num_generations, args.elbo_samples,
                       args.threads)
    print(format_table(result))
    if args.json:
        from ..utils import write_json_atomic

        write_json_atomic(result, args.json, indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
