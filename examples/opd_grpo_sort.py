"""OPD then diffusion GRPO on the synthetic sort task: the README's trainer snippet, runnable as it stands.

    python examples/opd_grpo_sort.py --output_dir runs/opd-grpo-sort
    python examples/opd_grpo_sort.py --output_dir runs/opd-grpo-sort --student runs/cft-sort --teacher runs/my-ar

Without ``--student``/``--teacher`` it builds a tiny Qwen3 student (converted to block diffusion, block 4) and a tiny
AR teacher from configs (random weights, saved under ``OUTPUT_DIR/teacher``), so it shows the wiring in seconds,
not learning. With ``--student`` (e.g. the output of ``examples/cft_sort.py``) and ``--teacher`` (an AR model directory
whose tokenizer shares the student's vocabulary) it distils and then reinforces real models. The reward is
:func:`diffgr2_trl.synthetic.sort_reward` (TRL's reward signature: partial credit per correct position).

Each phase prints one line: ``opd: N steps, kl A -> B`` and ``grpo: N steps, reward A -> B`` (first and last logged
value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffgr2_trl import (
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    OnPolicyDistillationConfig,
    OnPolicyDistillationTrainer,
    build_model,
    convert_to_block_diffusion,
)
from diffgr2_trl.synthetic import sort_dataset, sort_reward, sort_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32)


def _models(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.student:
        student = AutoModelForCausalLM.from_pretrained(args.student)
        tok = AutoTokenizer.from_pretrained(args.student)
    else:
        tok = sort_tokenizer()
        student = build_model("qwen3", tokenizer=tok, shape=TINY, seed=0)
        convert_to_block_diffusion(student, tok, block_size=4)
    teacher = args.teacher
    if teacher is None:
        teacher = str(Path(args.output_dir) / "teacher")
        teacher_tok = sort_tokenizer()
        build_model("qwen3", tokenizer=teacher_tok, shape=TINY, seed=1).save_pretrained(teacher)
        teacher_tok.save_pretrained(teacher)
    return student, tok, teacher


def _first_last(trainer, key: str) -> tuple[float, float]:
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[0], values[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/opd-grpo-sort")
    parser.add_argument("--student", default=None, help="A block-diffusion model directory (default: a tiny one).")
    parser.add_argument("--teacher", default=None, help="An AR model directory (default: a tiny one).")
    parser.add_argument("--max_steps", type=int, default=2, help="Steps of each phase.")
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    common = dict(max_steps=args.max_steps, use_cpu=cpu, bf16=False, report_to=[], logging_steps=1,
                  save_strategy="no", disable_tqdm=True, seed=0, max_completion_length=16, tau=0.9)
    student, tok, teacher = _models(args)
    prompts = sort_dataset(64, seed=1).select_columns(["prompt", "target"])  # prompts; the target feeds the reward
    ds = prompts

    # --- the README's snippet (with the sort reward in place of the re-ranking rewards) ---
    opd = OnPolicyDistillationTrainer(student, args=OnPolicyDistillationConfig(
                                      f"{args.output_dir}/opd", teacher_model=teacher, num_generations=4,
                                      per_device_train_batch_size=4, learning_rate=1e-3, **common),
                                      train_dataset=prompts, processing_class=tok)
    opd.train()
    rl = DiffusionGRPOTrainer(student, reward_funcs=sort_reward, processing_class=tok,
                              args=DiffusionGRPOConfig(f"{args.output_dir}/rl", num_generations=4, epsilon=0.2,
                                                       per_device_train_batch_size=8, learning_rate=1e-4, **common),
                              train_dataset=ds)
    rl.train()
    # ---
    kl0, kl1 = _first_last(opd, "kl")
    print(f"opd: {opd.state.global_step} steps, kl {kl0:.4f} -> {kl1:.4f}")
    r0, r1 = _first_last(rl, "reward")
    print(f"grpo: {rl.state.global_step} steps, reward {r0:.4f} -> {r1:.4f}")


if __name__ == "__main__":
    main()
