"""Backward-compatible alias of :mod:`diffgr2_trl.rewards.rerank` for ``rewards.rerank.X`` paths run from the
repository root; use ``diffgr2_trl.rewards.rerank.X``."""

from diffgr2_trl.rewards.rerank import *  # noqa: F403
from diffgr2_trl.rewards.rerank import __all__  # noqa: F401
