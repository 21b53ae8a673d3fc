"""Launches that would silently train something other than what was asked are refused before training starts."""

from __future__ import annotations

import os

__all__ = ["check_launch"]

_CPU_ADVICE = ("On CPU, launch with examples/accelerate/ddp.yaml and pass --use_cpu (use_cpu=True) to the script: "
               "accelerate then joins the processes over gloo.")


def check_launch(accelerator) -> None:
    """Raise if the processes were launched as a group but will not train as one.

    Two cases, both measured with ``accelerate launch`` on a CPU-only machine: without ``use_cpu`` each of the N
    launched processes finds no GPU and trains alone (N copies writing one ``output_dir``); with an FSDP or
    DeepSpeed config, accelerate runs plain DDP instead (its FSDP and DeepSpeed plugins need GPUs), so a user who
    asked for sharding would not get it and would not be told.
    """
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    running = accelerator.distributed_type
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"This process was launched as one of {world} (WORLD_SIZE={world}), but accelerate trains it alone "
            f"(distributed type {running}): every process would train its own copy and write the same output_dir. "
            + _CPU_ADVICE)
    for variable, wanted in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                             ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "false").lower() == "true" and running != wanted:
            raise RuntimeError(
                f"The launch config asks for {wanted.value} ({variable}=true), but accelerate runs {running}: its "
                f"{wanted.value} support needs GPUs, and on CPU it falls back to DDP without sharding anything. "
                + _CPU_ADVICE + " Sharded training (FSDP2, ZeRO-3) needs a GPU machine.")
