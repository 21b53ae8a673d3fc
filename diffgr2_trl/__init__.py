"""diffgr2-trl: block-diffusion re-rankers with Hugging Face TRL.

The public API is importable from the top level, as in TRL (``from trl import GRPOTrainer``)::

    from diffgr2_trl import convert_to_block_diffusion, BlockDiffusionSampler, DiffusionGRPOTrainer

Names are resolved on first use, so ``import diffgr2_trl`` stays cheap (no torch, transformers or TRL import) and
the ``diffgr2`` CLI starts only what a subcommand needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    # block-diffusion core
    "BlockDecodingConfig": "block_diffusion",
    "BlockDiffusionSampler": "block_diffusion",
    "BlockDiffusionSpec": "block_diffusion",
    "SamplerOutput": "block_diffusion",
    "convert_to_block_diffusion": "block_diffusion",
    "get_spec": "block_diffusion",
    "left_pad": "block_diffusion",
    "replay_logprobs": "block_diffusion",
    "unwrap_model": "block_diffusion",
    # trainers
    "BlockDiffusionConfig": "trainers",
    "BlockDiffusionTrainer": "trainers",
    "DataCollatorForBlockDiffusion": "trainers",
    "DiffusionGRPOConfig": "trainers",
    "DiffusionGRPOTrainer": "trainers",
    "OnPolicyDistillationConfig": "trainers",
    "OnPolicyDistillationTrainer": "trainers",
    # AR teachers
    "HFTeacher": "teachers",
    "Teacher": "teachers",
    "VLLMServerTeacher": "teachers",
    "load_teacher": "teachers",
    # small models built locally (tests, examples, the pipeline)
    "build_model": "modeling",
    "build_word_tokenizer": "modeling",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffgr2_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .block_diffusion import (  # noqa: F401
        BlockDecodingConfig,
        BlockDiffusionSampler,
        BlockDiffusionSpec,
        SamplerOutput,
        convert_to_block_diffusion,
        get_spec,
        left_pad,
        replay_logprobs,
        unwrap_model,
    )
    from .modeling import build_model, build_word_tokenizer  # noqa: F401
    from .teachers import HFTeacher, Teacher, VLLMServerTeacher, load_teacher  # noqa: F401
    from .trainers import (  # noqa: F401
        BlockDiffusionConfig,
        BlockDiffusionTrainer,
        DataCollatorForBlockDiffusion,
        DiffusionGRPOConfig,
        DiffusionGRPOTrainer,
        OnPolicyDistillationConfig,
        OnPolicyDistillationTrainer,
    )
