"""TRL trainers for the three stages: CFT, on-policy distillation, diffusion GRPO."""

from .cft import BlockDiffusionConfig, BlockDiffusionTrainer, DataCollatorForBlockDiffusion
from .grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer
from .opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer

__all__ = [
    "BlockDiffusionConfig", "BlockDiffusionTrainer", "DataCollatorForBlockDiffusion", "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer", "OnPolicyDistillationConfig", "OnPolicyDistillationTrainer",
]
