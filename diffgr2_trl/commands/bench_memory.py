"""``diffgr2 bench-memory``: peak memory of one OPD step and one GRPO step against vocabulary size and completion length.

Each case runs in a fresh Python process, so one case's allocations cannot hide another's peak. The models are tiny
in width (``--shape``, random weights built locally) but have the real vocabulary (a word tokenizer of
``vocab_size`` tokens, tied embeddings as in Qwen3), because the vocabulary is what the memory grows with: logits and
log-probs are ``(rows, T, V)``. OPD uses a local (in-process HF) teacher with the trainer's default settings; GRPO
uses trajectory replay and a random reward so that no group is dropped.

What is measured, on CPU: the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) after one
training step, and the resident set just before it (models, tokenizer, trainer built: ``setup``). torch keeps no
peak statistics for its CPU allocator, so the peak RSS is the figure; it includes the Python interpreter and the
libraries (a constant few hundred MB). On CUDA the figure is ``torch.cuda.max_memory_allocated`` over the step
instead (``scripts/gpu_check.sh`` runs that). Example (results/memory_bench.md):

    OMP_NUM_THREADS=1 diffgr2 bench-memory --cases opd:32000:128,opd:151936:128 --json memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ._args import parse_command

DEFAULT_CASES = ",".join(f"{t}:{v}:{n}" for t in ("opd", "grpo") for v in (32000, 151936) for n in (128, 512))


@dataclass
class BenchMemoryArguments:
    """Arguments of ``diffgr2 bench-memory``.

    Parameters:
        cases: comma-separated ``trainer:vocab_size:completion_length`` cases, ``trainer`` one of ``opd``, ``grpo``.
        shape: model width (``diffgr2_trl.modeling.MODEL_SHAPES``) of student, teacher and policy.
        block_size / prompt_len / prompts / num_generations: the step (rows = prompts x num_generations).
        opd_config / grpo_config: JSON objects of extra config fields for the OPD / GRPO trainer (e.g.
            ``'{"likelihood_recompute": true}'``); empty: the trainer's defaults.
        timeout: seconds per case; a case past it is reported as timed out.
        threads: torch intra-op CPU threads in each case's process (0: torch's default, or OMP_NUM_THREADS).
        json: also write the results to this path.
    """

    cases: str = field(default=DEFAULT_CASES, metadata={"help": "trainer:vocab:length cases, comma-separated."})
    shape: str = field(default="tiny", metadata={"help": "Model width (a MODEL_SHAPES key)."})
    block_size: int = field(default=4, metadata={"help": "Block size of the converted models."})
    prompt_len: int = field(default=32, metadata={"help": "Prompt tokens."})
    prompts: int = field(default=4, metadata={"help": "Prompts per step."})
    num_generations: int = field(default=4, metadata={"help": "Rollouts per prompt."})
    opd_config: str = field(default="{}", metadata={"help": "JSON: extra OnPolicyDistillationConfig fields."})
    grpo_config: str = field(default="{}", metadata={"help": "JSON: extra DiffusionGRPOConfig fields."})
    timeout: int = field(default=1800, metadata={"help": "Seconds per case."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads per case (0: torch's default)."})
    json: str | None = field(default=None, metadata={"help": "Write results to this JSON file."})


def parse_cases(cases: str) -> list[tuple[str, int, int]]:
    """``"opd:32000:128,grpo:151936:512"`` -> ``[("opd", 32000, 128), ("grpo", 151936, 512)]``."""
    out = []
    for case in filter(None, (c.strip() for c in cases.split(","))):
        parts = case.split(":")
        if len(parts) != 3 or parts[0] not in ("opd", "grpo") or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"--cases: {case!r} is not trainer:vocab_size:completion_length with trainer opd or grpo "
                             "(e.g. opd:151936:128).")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    if not out:
        raise ValueError("--cases is empty.")
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case: Mapping[str, Any]) -> dict:
    """One step of one trainer, in this process; returns the memory figures (see the module docstring)."""
    import random
    import tempfile
    import time

    import torch
    from datasets import Dataset

    from ..block_diffusion import convert_to_block_diffusion
    from ..modeling import MODEL_SHAPES, build_model, build_word_tokenizer

    if case["threads"] > 0:
        torch.set_num_threads(case["threads"])
    vocab, length, rows = case["vocab_size"], case["completion_length"], case["prompts"]
    # 4 special tokens (pad, eos, bos, unk) + words: exactly `vocab` tokens, as a real tokenizer of that size
    words = [f"w{i}" for i in range(vocab - 4)]
    teacher_tok = build_word_tokenizer(words)
    shape = {**MODEL_SHAPES[case["shape"]], "tie_word_embeddings": True}
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt": " ".join(words[i] for i in torch.randint(len(words), (case["prompt_len"],), generator=g))}
               for _ in range(rows)]
    student_tok = build_word_tokenizer(words)
    student = build_model("qwen3", tokenizer=student_tok, shape=shape, seed=1,
                          max_position_embeddings=case["prompt_len"] + length + 64)
    convert_to_block_diffusion(student, student_tok, block_size=case["block_size"])
    cuda = torch.cuda.is_available()
    common = dict(use_cpu=not cuda, bf16=False, report_to=[], disable_tqdm=True, save_strategy="no", max_steps=1,
                  num_generations=case["num_generations"], max_completion_length=length, learning_rate=1e-6,
                  logging_steps=1)
    with tempfile.TemporaryDirectory() as out:
        if case["trainer"] == "opd":
            from ..teachers import HFTeacher
            from ..trainers.opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer

            teacher_model = build_model("qwen3", tokenizer=teacher_tok, shape=shape, seed=0,
                                        max_position_embeddings=case["prompt_len"] + length + 64)
            teacher = HFTeacher(teacher_model.to(student.device if not cuda else "cuda"))
            config = OnPolicyDistillationConfig(out, per_device_train_batch_size=rows, **common, **case["extra"])
            trainer = OnPolicyDistillationTrainer(student, teacher=teacher, args=config,
                                                  train_dataset=Dataset.from_list(prompts),
                                                  processing_class=student_tok, teacher_tokenizer=teacher_tok)
        else:
            from ..trainers.grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer

            rng = random.Random(0)

            def random_reward(completions, **kwargs):  # varied rewards: no group is dropped from the loss
                return [rng.random() for _ in completions]

            config = DiffusionGRPOConfig(out, per_device_train_batch_size=rows * case["num_generations"], **common,
                                         **case["extra"])
            trainer = DiffusionGRPOTrainer(student, reward_funcs=[random_reward], args=config,
                                           train_dataset=Dataset.from_list(prompts), processing_class=student_tok)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            setup = torch.cuda.memory_allocated() / 2**20
        else:
            setup = _rss_mb()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {"setup_mb": round(setup, 1), "peak_mb": round(peak, 1), "step_s": round(seconds, 2),
            "measure": "cuda max_memory_allocated" if cuda else "peak RSS (ru_maxrss)"}


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchMemoryArguments]:
    return parse_command("bench-memory", (BenchMemoryArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    return run(*parse(argv))


def _extra(name: str, text: str) -> dict:
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{name} must be a JSON object, got {text!r} ({e}).") from None
    if not isinstance(extra, dict):
        raise ValueError(f"--{name} must be a JSON object, got {text!r}.")
    return extra


def run(args: BenchMemoryArguments) -> int:
    """Run every case in its own process; print one line per case and (``args.json``) write them all."""
    cases = parse_cases(args.cases)
    extras = {"opd": _extra("opd_config", args.opd_config), "grpo": _extra("grpo_config", args.grpo_config)}
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}.")
    results: dict = {"args": asdict(args), "cases": []}
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    for trainer, vocab, length in cases:
        case = {"trainer": trainer, "vocab_size": vocab, "completion_length": length, "shape": args.shape,
                "block_size": args.block_size, "prompt_len": args.prompt_len, "prompts": args.prompts,
                "num_generations": args.num_generations, "threads": args.threads, "extra": extras[trainer]}
        code = ("import json, sys; from diffgr2_trl.commands.bench_memory import run_case; "
                "print('BENCH_MEMORY ' + json.dumps(run_case(json.loads(sys.argv[1]))))")
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True,
                                  timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout} s"}
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_MEMORY ")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1][len("BENCH_MEMORY "):])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                row = {"error": f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0
                                                                   else "") + ": " + " | ".join(tail)}
        row = {"trainer": trainer, "vocab_size": vocab, "completion_length": length, **row}
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all("error" not in r for r in results["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
