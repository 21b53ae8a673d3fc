"""Backward-compatible alias of :mod:`diffgr2_trl.rewards`, importable only from the repository root.

This folder is not installed (a top-level ``rewards`` package collides with a user's own ``rewards.py``); new code
and configs use ``diffgr2_trl.rewards.rerank.X``.
"""
