"""Re-ranking rewards for TRL's CLI: ``trl grpo --reward_funcs diffgr2_trl.rewards.rerank.gr2_reward
diffgr2_trl.rewards.rerank.validity``.

The functions are defined once, in :mod:`diffgr2_trl.rerank.scoring` (see there for the dataset-column contract);
this module re-exports them under a dotted path that TRL resolves from any working directory.
"""

from ..rerank.scoring import *  # noqa: F403
from ..rerank.scoring import __all__  # noqa: F401
