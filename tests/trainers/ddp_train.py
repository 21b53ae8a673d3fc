"""Train CFT, OPD and diffusion GRPO a few steps each, deterministically, and record what this process did.

``tests/trainers/test_ddp.py`` launches this script on two CPU processes exactly as the README says::

    accelerate launch --multi_gpu --num_processes 2 tests/trainers/ddp_train.py --output_dir OUT --use_cpu

and calls :func:`train` in-process as the one-process reference, with the same global batch (per-device batch x
processes x accumulation steps) in one micro-batch. Each process writes
``OUT/<trainer>/rank<r>.json`` (its rank, world size, backend, logged losses and a checksum of its parameters); rank 0
also saves the final parameters to ``OUT/<trainer>/params.pt``.

Everything random is taken out so the two runs can be compared parameter by parameter:

* CFT masks every completion token (``min_mask_ratio = max_mask_ratio = 1``), so the noise draw, which differs
  between one process and two, has no effect;
* OPD rolls out greedily (``temperature=0``). GRPO cannot (identical rollouts in a group have opposite advantages
  and equal gradients: no update), so it samples each rollout alone, seeded by its prompt and its index in the group
  (TRL hands each process whole groups, in order): a rollout is then the same whichever process draws it;
* plain SGD: Adam's per-parameter normalisation would blow float rounding differences on near-zero gradients up
  into visible updates;
* lists of 2 to 6 values, so prompts and completions differ in length and the ranks and micro-batches of a step hold
  different token counts: a per-rank or per-micro-batch mean, averaged by DDP and the accumulation, would differ from
  the mean over the global batch (the trainers normalise over the whole step instead).

CFT's complementary masks (two forwards; the complement of "all masked" is empty) and OPD's replay split over several
forwards (``max_streams_per_forward``) make each process run more than one DDP forward before a backward.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import torch

from diffgr2_trl.block_diffusion import convert_to_block_diffusion, unwrap_model
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_example, sort_tokenizer
from tests.helpers import leave_without_finalizing

TRAINERS = ("cft", "opd", "grpo")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16)
NUM_GENERATIONS = 2


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Digits in the completion: varies between sampled rollouts even for an untrained model (the sort reward is 0)."""
    return [float(sum(w.isdigit() for w in c.split())) for c in completions]


def _grpo_trainer_class():
    from diffgr2_trl.trainers import DiffusionGRPOTrainer

    class PerRowSeededGRPOTrainer(DiffusionGRPOTrainer):
        """Samples each rollout alone, seeded by (its prompt, its index in the group)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            ids, logprobs, contexts = [], [], []
            for i, prompt in enumerate(prompt_ids):
                torch.manual_seed(zlib.crc32(json.dumps([list(prompt), i % NUM_GENERATIONS]).encode()))
                c, lp = super()._generate_single_turn([prompt], images, multimodal_fields, 1, has_tool_images)
                ids, logprobs = ids + c, logprobs + lp
                contexts.append(self._rollout_ctx)
            self._rollout_ctx = {k: torch.cat([c[k] for c in contexts]) for k in contexts[0]}
            return ids, logprobs

    return PerRowSeededGRPOTrainer


def dataset(n: int = 64, seed: int = 0):
    """Sort rows of 2 to 6 values (unequal token counts per row)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([sort_example(rng, rng.randint(2, 6)) for _ in range(n)])


def _model():
    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SHAPE, seed=0)
    convert_to_block_diffusion(model, tok, block_size=4)
    return model, tok


def _common(output_dir: str, max_steps: int, use_cpu: bool, accumulation: int) -> dict:
    return dict(output_dir=output_dir, use_cpu=use_cpu, bf16=False, max_steps=max_steps, optim="sgd",
                gradient_accumulation_steps=accumulation,
                learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                disable_tqdm=True, seed=0, dataloader_num_workers=0)


def _trainer(name: str, output_dir: str, per_device: int, max_steps: int, use_cpu: bool, accumulation: int = 1):
    """A trainer of kind ``name`` whose global batch is ``per_device x world size x accumulation`` (x
    ``NUM_GENERATIONS`` rows for OPD, whose batch counts prompts)."""
    model, tok = _model()
    common = _common(output_dir, max_steps, use_cpu, accumulation)
    if name == "cft":
        from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

        args = BlockDiffusionConfig(per_device_train_batch_size=per_device, min_mask_ratio=1.0, max_mask_ratio=1.0,
                                    complementary_masks=True, **common)
        return BlockDiffusionTrainer(model, args=args, train_dataset=dataset(), processing_class=tok)
    prompts = dataset().select_columns(["prompt", "target"])
    if name == "opd":
        from diffgr2_trl.trainers import OnPolicyDistillationConfig, OnPolicyDistillationTrainer
        from tests.trainers.opd_helpers import SortRuleTeacher

        teacher = SortRuleTeacher()
        args = OnPolicyDistillationConfig(per_device_train_batch_size=per_device, num_generations=NUM_GENERATIONS,
                                          max_completion_length=8, temperature=0.0, max_streams_per_forward=2, **common)
        return OnPolicyDistillationTrainer(model, teacher=teacher, args=args, train_dataset=prompts,
                                           processing_class=tok, teacher_tokenizer=teacher.tokenizer)
    if name == "grpo":
        from diffgr2_trl.trainers import DiffusionGRPOConfig

        args = DiffusionGRPOConfig(per_device_train_batch_size=per_device, num_generations=NUM_GENERATIONS,
                                   max_completion_length=8, temperature=1.0, **common)
        return _grpo_trainer_class()(model, reward_funcs=digit_reward, args=args, train_dataset=prompts,
                                     processing_class=tok)
    raise ValueError(f"Unknown trainer {name!r}; expected one of {TRAINERS}.")


def train(name: str, output_dir: str | os.PathLike, per_device: int, max_steps: int = 3, use_cpu: bool = True,
          accumulation: int = 1) -> dict:
    """Train ``name`` for ``max_steps``; write this process's record (and, on rank 0, the parameters); return it."""
    out = Path(output_dir) / name
    trainer = _trainer(name, str(out), per_device, max_steps, use_cpu, accumulation)
    trainer.train()
    state = trainer.accelerator.state
    named = list(unwrap_model(trainer.model).named_parameters())
    sharded = any(hasattr(p, "full_tensor") for _, p in named)  # FSDP2 holds DTensor shards
    # full_tensor() is a collective: every rank gathers, in the same order.
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone() for n, p in named}
    record = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": sharded,
        "rank": state.process_index,
        "world_size": state.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "global_step": trainer.state.global_step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "param_checksum": float(sum(p.double().sum() for p in params.values())),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))
    if state.is_main_process:
        torch.save(params, out / "params.pt")
    trainer.accelerator.wait_for_everyone()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--use_cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes share two cores (and a test session's other work)
    for name in args.trainers:
        train(name, args.output_dir, args.per_device_train_batch_size, args.max_steps, args.use_cpu,
              args.gradient_accumulation_steps)
    leave_without_finalizing()


if __name__ == "__main__":
    main()
