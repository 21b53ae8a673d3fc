"""Re-ranking rewards for TRL's CLI: ``trl grpo --reward_funcs rewards.rerank.gr2_reward rewards.rerank.validity``.

The functions are defined once, in :mod:`diffgr2_trl.rerank.scoring` (see there for the dataset-column contract);
this module re-exports them so the dotted paths TRL resolves stay short.
"""

from diffgr2_trl.rerank.scoring import *  # noqa: F403
from diffgr2_trl.rerank.scoring import __all__  # noqa: F401
