"""The re-ranking task: data, pre-ranker, semantic IDs, candidates, metrics."""
