"""Reward functions with TRL's signature, importable by dotted path from TRL's CLI
(``trl grpo --reward_funcs diffgr2_trl.rewards.rerank.gr2_reward``).

The path is namespaced under ``diffgr2_trl`` so that it never collides with a ``rewards.py`` or ``rewards/`` of the
user's own project (a common GRPO layout), which a top-level ``rewards`` package would shadow or be shadowed by.
See :mod:`diffgr2_trl.rewards.rerank` for the re-ranking rewards and their dataset-column contract.
"""
