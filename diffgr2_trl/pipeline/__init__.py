"""The whole Diffusion-GR2 recipe as resumable stages (``diffgr2 pipeline``)."""

from .runner import PIPELINE_STAGES, PipelineArguments, load_preset, run_pipeline
from .stages import STAGE_NAMES

__all__ = ["PIPELINE_STAGES", "STAGE_NAMES", "PipelineArguments", "load_preset", "run_pipeline"]
