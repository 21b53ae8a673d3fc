"""diffgr2-trl: block-diffusion re-rankers with Hugging Face TRL."""

from ._warnings import filter_known_warnings

# Before any submodule imports TRL / PEFT / vLLM, whose import-time notices these filters drop.
filter_known_warnings()
