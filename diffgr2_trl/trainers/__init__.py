"""TRL trainers for the three stages: CFT, on-policy distillation, diffusion GRPO."""

from .._warnings import filter_known_warnings

filter_known_warnings()  # again, right before TRL is imported (see diffgr2_trl._warnings); hence E402 below

from .cft import BlockDiffusionConfig, BlockDiffusionTrainer, DataCollatorForBlockDiffusion  # noqa: E402
from .grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer  # noqa: E402
from .opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer  # noqa: E402

__all__ = [
    "BlockDiffusionConfig", "BlockDiffusionTrainer", "DataCollatorForBlockDiffusion", "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer", "OnPolicyDistillationConfig", "OnPolicyDistillationTrainer",
]
