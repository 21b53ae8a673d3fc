"""The block-diffusion spec: every knob that public block-diffusion projects disagree on, saved with the model.

The spec lives in ``model.config.block_diffusion`` (a plain dict), so ``save_pretrained`` / ``from_pretrained``
round-trip it with stock transformers and no remote code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..errors import OptionError
from .wrappers import unwrap_model

SPEC_KEY = "block_diffusion"


@dataclass
class BlockDiffusionSpec:
    """How a causal LM is used as a block-diffusion LM.

    Parameters:
        block_size: tokens per block. The completion is cut into blocks from its first token; a block is
            denoised in parallel, blocks are generated left to right.
        mask_token_id: id of the mask token written into noised / undecoded positions.
        token_shift: AR token shift: the hidden state at position ``i-1`` predicts token ``i`` (the converted model
            starts from the AR model's behaviour). The first token of a block is predicted by the clean stream's
            last position of the previous block (or of the prompt).
        clean_block_causal: whether committed completion blocks attend to each other block-causally (BD3-LM,
            bidirectional inside a committed block) or plain causally (keeps the AR model's context
            representations exactly). The prompt is always causal. Training and the sampler's KV cache both
            read this field, so they cannot disagree.
        noise_per: draw the noise level ``t`` once per ``"block"`` (default) or once per ``"sequence"``.
        noise_schedule: mask ratio as a function of ``t ~ U(min_mask_ratio, max_mask_ratio)``:
            ``"linear"`` (ratio = t) or ``"cosine"`` (ratio = 1 - cos(pi t / 2)).
        min_mask_ratio / max_mask_ratio: range of ``t``.
        inverse_t_weighting: weight each masked token's loss by 1 / mask ratio (the MDLM ELBO weight).
        complementary_masks: train on each mask and its complement, so every completion token is masked once
            per pair (doubles the effective batch).
    """

    block_size: int = 32
    mask_token_id: int = -1
    token_shift: bool = True
    clean_block_causal: bool = True
    noise_per: Literal["block", "sequence"] = "block"
    noise_schedule: Literal["linear", "cosine"] = "linear"
    min_mask_ratio: float = 1e-3
    max_mask_ratio: float = 1.0
    inverse_t_weighting: bool = False
    complementary_masks: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise OptionError("block_size", f"must be a positive integer, got {self.block_size!r}.")
        if self.noise_per not in ("block", "sequence"):
            raise OptionError("noise_per", f"must be 'block' or 'sequence', got {self.noise_per!r}.")
        if self.noise_schedule not in ("linear", "cosine"):
            raise OptionError("noise_schedule", f"must be 'linear' or 'cosine', got {self.noise_schedule!r}.")
        if not 0.0 <= self.min_mask_ratio <= self.max_mask_ratio <= 1.0:
            raise ValueError(
                f"Need 0 <= min_mask_ratio <= max_mask_ratio <= 1, got {self.min_mask_ratio}, {self.max_mask_ratio}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockDiffusionSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown block-diffusion spec fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


def get_spec(model_or_config: Any) -> BlockDiffusionSpec:
    """Read the spec from a (possibly PEFT-, DDP- or otherwise wrapped) model or its config; raise if it was never
    converted."""
    model_or_config = unwrap_model(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, SPEC_KEY, None)
    if data is None:
        # PEFT wraps the model; its config is the base model's.
        base = getattr(model_or_config, "get_base_model", None)
        if callable(base):
            data = getattr(base().config, SPEC_KEY, None)
    if data is None:
        raise ValueError(
            "This model was not converted to block diffusion (no `block_diffusion` entry in its config). "
            "Run `diffgr2_trl.convert_to_block_diffusion(model, tokenizer)` or `diffgr2 convert` first."
        )
    if isinstance(data, BlockDiffusionSpec):
        return data
    return BlockDiffusionSpec.from_dict(dict(data))


def set_spec(model: Any, spec: BlockDiffusionSpec) -> None:
    spec.validate()
    setattr(model.config, SPEC_KEY, spec.to_dict())
