"""Reward functions for TRL trainers, importable by dotted path from TRL's CLI (``--reward_funcs rewards.rerank.X``).

See :mod:`rewards.rerank` for the re-ranking rewards and their dataset-column contract.
"""
