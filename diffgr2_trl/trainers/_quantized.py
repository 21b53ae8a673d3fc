"""Keep bitsandbytes 4-bit layers differentiable across eval/train switches (QLoRA on any CPU).

Why this module exists: on a CPU with AVX512-BF16 (an Intel Xeon), bitsandbytes (>= 0.49) repacks a ``Linear4bit``
weight into an inference layout on the first eval-mode forward whose input needs no gradient. Every later forward,
train mode included, then runs ``bitsandbytes::gemv_4bit``, which has no autograd kernel: no gradient reaches the
layer's input, so LoRA adapters *below* a 4-bit layer stop learning, and the run reports ``grad_norm 0`` without an
error. Rollouts (GRPO, OPD) and the trainers' mask probe run in eval mode, so a QLoRA policy would train nothing after
its first rollout. Machines without the instruction set never repack, so the bug hides there.

Every trainer calls :func:`keep_4bit_layers_trainable` once at set-up: it turns the repacking off, restores the
training layout of any weight repacked before (a model evaluated before it was handed to the trainer), and checks
with a probe that gradients flow through a 4-bit layer after an eval-mode forward. If they cannot, it raises before
training starts instead of letting a zero-gradient run go on.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["keep_4bit_layers_trainable"]

_FIX = ("Upgrade or downgrade bitsandbytes to a version whose CPU 4-bit layers keep a training layout, or train "
        "QLoRA on a GPU.")


def _linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing quantized with bitsandbytes can exist unless it was imported
        return []
    cls = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return [m for m in model.modules() if cls is not None and isinstance(m, cls)]


def _is_repacked(layer: torch.nn.Module) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def _restore_training_layout(layer: torch.nn.Module, name: str) -> None:
    functional = sys.modules["bitsandbytes"].functional
    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError(
            f"The 4-bit layer {name!r} was repacked for CPU inference (an eval-mode forward ran before training) and "
            f"this bitsandbytes {getattr(sys.modules['bitsandbytes'], '__version__', '?')} offers no way back: its "
            f"adapters would get no gradient. Reload the model and hand it to the trainer before any eval forward. {_FIX}")
    state = layer.weight.quant_state
    packed_absmax = state.absmax  # [K / blocksize, N] in bf16 in the inference layout
    layer.weight.data, state = inverse(layer.weight.data, state)
    if not state.nested:
        # bitsandbytes 0.50's inverse restores absmax only for nested (double-quant) states; left transposed, the
        # scales of a row with several blocks would be applied to the wrong blocks. Codes are exact; the scales keep
        # the bf16 rounding of the inference layout (~1e-3 relative).
        state.absmax = packed_absmax.T.reshape(-1).to(torch.float32).contiguous()
    layer.weight.quant_state = state


def _gradient_probe(layer: torch.nn.Module, name: str) -> None:
    """An eval-mode no-grad forward (what a rollout does), then a train-mode forward must pass a gradient back."""
    was_training = layer.training
    device = layer.weight.device
    dtype = layer.compute_dtype if getattr(layer, "compute_dtype", None) is not None else torch.float32
    x = torch.randn(2, layer.in_features, device=device, dtype=dtype)
    try:
        layer.eval()
        with torch.no_grad():
            layer(x)
        layer.train()
        x.requires_grad_(True)
        # autograd.grad, not backward: the probe must leave no .grad on the layer's own parameters
        out = layer(x).float().sum()
        (grad,) = torch.autograd.grad(out, x, allow_unused=True) if out.requires_grad else (None,)
    finally:
        layer.train(was_training)
    if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        if _is_repacked(layer):
            _restore_training_layout(layer, name)
        raise RuntimeError(
            f"The 4-bit layer {name!r} passes no gradient to its input after an eval-mode forward on this machine "
            f"(bitsandbytes {getattr(sys.modules['bitsandbytes'], '__version__', '?')}, device {device}): LoRA "
            f"adapters below it would not learn. {_FIX}")


def keep_4bit_layers_trainable(model: torch.nn.Module) -> int:
    """Make every bitsandbytes ``Linear4bit`` in ``model`` keep a differentiable layout; return how many there are.

    Turns off the CPU inference repacking (``support_avx512bf16_for_cpu``), restores the training layout of weights
    already repacked, then probes one layer. A model without 4-bit layers is left untouched (returns 0).

    Raises:
        RuntimeError: when a 4-bit layer cannot pass gradients after an eval-mode forward here, naming the layer.
    """
    names = {m: n for n, m in model.named_modules()}
    layers = _linear4bit_layers(model)
    for layer in layers:
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
        if _is_repacked(layer):
            _restore_training_layout(layer, names.get(layer, "?"))
    if layers:
        _gradient_probe(layers[0], names.get(layers[0], "?"))
    return len(layers)
