"""TRL trainers for the three stages: CFT, on-policy distillation, diffusion GRPO."""

from .cft import BlockDiffusionConfig, BlockDiffusionTrainer, DataCollatorForBlockDiffusion
from .opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer

__all__ = [
    "BlockDiffusionConfig", "BlockDiffusionTrainer", "DataCollatorForBlockDiffusion", "OnPolicyDistillationConfig",
    "OnPolicyDistillationTrainer",
]
