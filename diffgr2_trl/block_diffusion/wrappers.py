"""The one place that looks through training wrappers (DDP, DataParallel, DeepSpeed, FSDP, ``torch.compile``).

The core *calls* the model it is given, so a DDP wrapper's forward runs and gradients are synchronised across
processes; but it *reads* ``config``, ``dtype`` and ``get_output_embeddings`` from the model inside, because wrappers
do not forward attributes (``'DistributedDataParallel' object has no attribute 'config'``). A PEFT model is not a
wrapper in this sense: it forwards those attributes to its base model itself.
"""

from __future__ import annotations

import torch

# Matched by class name so that DeepSpeed (optional) and torch._dynamo (slow to import) are never imported here;
# each keeps the wrapped model in the attribute named here.
_WRAPPER_ATTRIBUTE = {
    "DeepSpeedEngine": "module", "PipelineEngine": "module", "FullyShardedDataParallel": "module",
    "OptimizedModule": "_orig_mod",
}


def _inner(model):
    """The model one wrapper level down, or None when ``model`` is not a wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        return model.module
    attr = _WRAPPER_ATTRIBUTE.get(type(model).__name__)
    inner = getattr(model, attr, None) if attr else None
    return inner if isinstance(inner, torch.nn.Module) else None


def unwrap_model(model):
    """The model inside any DDP / DataParallel / DeepSpeed / FSDP(1) / ``torch.compile`` wrappers (``model`` itself
    when it is not wrapped).

    Use it to read attributes; keep calling the wrapped model for forwards that need gradients.

    Example:
        >>> unwrap_model(torch.nn.parallel.DistributedDataParallel(model)) is model
        True
    """
    inner = _inner(model)
    while inner is not None:
        model, inner = inner, _inner(inner)
    return model


def forward_inside(model, fn, *args, **kwargs):
    """``fn(forward, *args, **kwargs)`` run inside one forward call of ``model`` (through its wrapper, if any).

    A computation that calls a model's submodules one by one, such as the replay's backbone forwards followed by
    the output layer on gathered states, must still run inside the wrapper's forward: FSDP gathers sharded
    parameters in its forward hooks (outside them the output layer's weight is a shard, or empty) and DDP prepares
    gradient synchronisation there. The module the wrapper calls has its ``forward`` swapped for ``fn`` for the
    duration of one call, as TRL's and Lightning's forward redirection do. ``fn`` receives that module's own
    ``forward`` and must call it, not the module, for its model forwards: calling the module would run its hooks
    (FSDP's unshard and reshard) a second time, nested in the first.
    """
    target = _inner(model) or model
    original = target.forward

    def redirected(*_args, **_kwargs):
        target.forward = original  # fn may call the real forward
        return fn(original, *args, **kwargs)

    had_attribute = "forward" in vars(target)
    target.forward = redirected
    try:
        # One placeholder argument: DDP with device_ids (every multi-GPU launch) indexes its moved inputs and fails
        # on an empty call.
        return model(torch.zeros(()))
    finally:
        if had_attribute:
            target.forward = original
        else:
            del target.forward
