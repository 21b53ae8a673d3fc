"""The model-agnostic block-diffusion core: pure torch, no Trainer."""

from .convert import check_attention_honours_masks, convert_to_block_diffusion
from .decoding import BlockDecodingConfig
from .likelihood import replay_logits, replay_logprobs
from .masks import allowed, dense_mask, flex_block_mask, visible
from .noise import mask_ratio, sample_noise_mask
from .objective import AlignedBatch, align_completions, block_diffusion_loss
from .sampler import BlockDiffusionSampler, SamplerOutput, left_pad
from .spec import BlockDiffusionSpec, get_spec, set_spec
from .wrappers import unwrap_model

__all__ = [
    "AlignedBatch", "BlockDecodingConfig", "BlockDiffusionSampler", "BlockDiffusionSpec", "SamplerOutput", "align_completions", "allowed", "visible",
    "block_diffusion_loss", "check_attention_honours_masks", "convert_to_block_diffusion", "dense_mask",
    "flex_block_mask", "get_spec", "left_pad", "mask_ratio", "replay_logits", "replay_logprobs", "sample_noise_mask", "set_spec", "unwrap_model",
]
