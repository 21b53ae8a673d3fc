"""A small verifiable task for tests, benchmarks and examples: sort a short list, reasoning first.

``prompt``: ``"sort 7 2 5 :"``; ``completion``: ``"think 2 5 7 answer 2 5 7"`` (+ EOS added by TRL). The
"think" part stands in for a reasoning trace and the "answer" part for the ranking, so segment weights, rewards
and parallel decoding can be exercised on a task whose right answer is known.
"""

from __future__ import annotations

import random

from .modeling import build_word_tokenizer

NUM_VALUES = 16


def sort_tokenizer():
    """Word-level tokenizer over the task's vocabulary (values 0..15 and the keywords)."""
    return build_word_tokenizer([str(i) for i in range(NUM_VALUES)] + ["sort", ":", "think", "answer"])


def sort_example(rng: random.Random, length: int = 4) -> dict:
    values = rng.sample(range(NUM_VALUES), length)
    ordered = " ".join(str(v) for v in sorted(values))
    reasoning = f"think {ordered} "
    return {
        "prompt": "sort " + " ".join(str(v) for v in values) + " : ",
        "completion": f"{reasoning}answer {ordered}",
        "answer_start": len(reasoning),
        "target": ordered,
    }


def sort_dataset(n: int, length: int = 4, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` sort examples (columns prompt, completion, answer_start, target)."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([sort_example(rng, length) for _ in range(n)])


def sort_reward(prompts, completions, target, **kwargs) -> list[float]:
    """TRL-signature reward: 1 for the correct sorted answer, partial credit per correct position, else 0."""
    out = []
    for completion, want in zip(completions, target):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        got = text.split("answer", 1)[1].split() if "answer" in text else []
        want_l = want.split()
        out.append(sum(g == w for g, w in zip(got, want_l)) / len(want_l))
    return out
