"""QLoRA on any CPU: 4-bit layers stay differentiable after eval-mode forwards (rollouts, probes).

On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight for inference on the first eval-mode forward; its later
forwards then pass no gradient. These tests fail on such a machine without ``keep_4bit_layers_trainable`` and pass
everywhere with it; the error path is exercised on every machine by a backend that drops gradients.
"""

from __future__ import annotations

import pytest
import torch

from diffgr2_trl.trainers._quantized import keep_4bit_layers_trainable
from tests.helpers import SMALL_SHAPE, quantized_sort_student


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))


def _first_layer_adapter_grad(model) -> float:
    """Gradient reaching the first decoder layer's LoRA A after an eval rollout-like forward, then a train step."""
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    model.eval()
    with torch.no_grad():  # what a rollout does: eval mode, no grad
        model(input_ids=ids)
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    return sum(float(g.abs().sum()) for g in grads)


def test_adapters_below_4bit_layers_learn_after_an_eval_forward(tmp_path):
    model, _ = quantized_sort_student(tmp_path / "base")
    model = _lora(model)
    assert keep_4bit_layers_trainable(model) == 7 * SMALL_SHAPE["num_hidden_layers"]
    assert _first_layer_adapter_grad(model) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)  # the probe left no grads


def test_a_model_repacked_before_the_trainer_gets_its_training_layout_back(tmp_path):
    """A user evaluates the 4-bit model first (repacking it on an AVX512-BF16 CPU), then trains it."""
    model, _ = quantized_sort_student(tmp_path / "base")
    ids = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        before = model.train()(input_ids=ids).logits  # train mode never repacks: the training layout's output
        model.eval()(input_ids=ids)  # repacks here on an AVX512-BF16 CPU
    keep_4bit_layers_trainable(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if type(m).__name__ == "Linear4bit")
    with torch.no_grad():
        after = model.train()(input_ids=ids).logits
    # the same 4-bit codes; only the per-block scales went through bf16 in the inference layout (scales applied to
    # the wrong blocks, as bitsandbytes' own inverse leaves them, move these logits by ~0.09)
    torch.testing.assert_close(after, before, atol=5e-3, rtol=0)
    assert _first_layer_adapter_grad(_lora(model)) > 0


def test_a_backend_without_gradients_fails_before_training(tmp_path, monkeypatch):
    import bitsandbytes

    model, _ = quantized_sort_student(tmp_path / "base")
    real = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **kw: real(*a, **kw).detach())
    with pytest.raises(RuntimeError, match=r"4-bit layer 'model\.layers\.0\.self_attn\.q_proj' passes no gradient"):
        keep_4bit_layers_trainable(model)


def test_models_without_4bit_layers_are_untouched():
    assert keep_4bit_layers_trainable(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
