"""Launches that would silently train something other than what was asked are refused before training starts."""

from __future__ import annotations

import os

__all__ = ["check_launch"]

_CPU_ADVICE = ("On CPU, launch with examples/accelerate/ddp.yaml and pass --use_cpu (use_cpu=True) to the script: "
               "accelerate then joins the processes over gloo.")


def check_launch(accelerator) -> None:
    """Raise if the processes were launched as a group but will not train as one.

    Three cases. Measured with ``accelerate launch`` on a CPU-only machine: without ``use_cpu`` each of the N
    launched processes finds no GPU and trains alone (N copies writing one ``output_dir``); with an FSDP or
    DeepSpeed config, accelerate runs plain DDP instead (its FSDP and DeepSpeed plugins need GPUs), so a user who
    asked for sharding would not get it and would not be told. Read from accelerate's state setup: an FSDP config
    launched as one process on one GPU runs as a plain single-device job (accelerate turns FSDP on only for a
    multi-process group), so its sharding and CPU offload never happen.
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
        if os.environ.get(variable, "false").lower() != "true" or running == wanted:
            continue
        device = getattr(getattr(accelerator, "device", None), "type", "cpu")
        if wanted == DistributedType.FSDP and accelerator.num_processes == 1 and device != "cpu":
            raise RuntimeError(
                f"The launch config asks for FSDP (ACCELERATE_USE_FSDP=true), but this is one process on one "
                f"{device} device, so accelerate runs {running} without FSDP: nothing is sharded or offloaded. "
                "Launch with --num_processes 2 or more (one per GPU), or without the FSDP config.")
        raise RuntimeError(
            f"The launch config asks for {wanted.value} ({variable}=true), but accelerate runs {running}: its "
            f"{wanted.value} support needs GPUs, and on CPU it falls back to DDP without sharding anything. "
            + _CPU_ADVICE + " Sharded training (FSDP2, ZeRO-3) needs a GPU machine.")
