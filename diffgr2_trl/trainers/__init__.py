"""TRL trainers for the three stages: CFT, on-policy distillation, diffusion GRPO."""

from .._warnings import known_notices_silenced

# TRL (and the vLLM it imports) print known-harmless notices at import: dropped for the import only, so the user's
# warning filters and loggers are left as they were (see diffgr2_trl._warnings).
with known_notices_silenced():
    from .cft import BlockDiffusionConfig, BlockDiffusionTrainer, DataCollatorForBlockDiffusion
    from .grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer
    from .opd import OnPolicyDistillationConfig, OnPolicyDistillationTrainer

__all__ = [
    "BlockDiffusionConfig", "BlockDiffusionTrainer", "DataCollatorForBlockDiffusion", "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer", "OnPolicyDistillationConfig", "OnPolicyDistillationTrainer",
]
