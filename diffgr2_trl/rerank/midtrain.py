"""SID mid-training: tasks that align a model from scratch (or a pretrained LM) to the item IDs before SFT.

A small model trained only on the re-ranking rows memorises them: it learns the answer format but writes frequent
IDs instead of copying the row's candidates (0% valid at CPU scale). Copying from context is learnable from scratch,
but only after tens of thousands of *diverse* lists (a phase change, as in-context copying emerges in small
transformers: Singh et al. 2024; Zucchet et al. 2025). These tasks provide that diversity from the training split
alone, in the prompt and answer template the re-ranker uses, as SID-based LLM recommenders align a model to its IDs:

- ``front``: move a named candidate to the front, keep the others in order (exactly the re-ranking answer once the
  explanation has named its top item);
- ``repeat``: repeat the candidate list;
- ``drop``: list the candidates without a named one;
- ``next``: next-item prediction over a user's training history, answered with one SID;
- ``attributes``: an item's brand/category tokens from its SID;
- ``rerank``: a re-ranking training row itself (prompt and offline-trace completion, from the prepared train split),
  so that copying is learnt in the full prompt too, not only in bare lists (a row can be drawn more than once);
- ``promote``: a re-ranking row's prompt with a random candidate other than the pre-ranker's first promoted, and the
  offline-trace completion written for that choice: promote-and-drop in the full prompt. A third of the real rows
  keep the pre-ranker's first item first (nothing to drop), and a model fed only those copies the pre-rank list
  with the promoted item still in its old slot (``results/copy_learning.md``); this task makes every row a drop.
  Prompts and promotions are drawn independently (any of nine per prompt), so a row can repeat, like ``rerank``'s.

With ``with_id_line=True`` the list tasks' prompts end with the candidate IDs written exactly as the answer writes them
(``IDs: ["<sid>", "<sid>", ...]``): the answer list can then be copied token after token from one line, without
skipping over attribute tokens (``results/copy_learning.md`` measures what it buys).

Lists draw random training items, so no two prompts repeat and no ordering or ID can be memorised; histories are
prefixes of training sequences (never a valid or test item).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .prompts import CANDIDATES_HEADER, HISTORY_HEADER, format_completion, format_id_line, parse_prompt, to_items
from .semantic_ids import SemanticIds
from .traces import offline_completion

__all__ = ["MID_TASKS", "ItemPool", "build_midtraining_rows", "parse_task_mix"]

MID_TASKS = ("front", "repeat", "drop", "next", "attributes", "rerank", "promote")
DEFAULT_MIX = {"front": 0.5, "repeat": 0.15, "drop": 0.15, "next": 0.15, "attributes": 0.05}


def parse_task_mix(spec: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"front=0.5,repeat=0.2"`` (or a mapping) -> normalised weights; unknown task names are an error."""
    if spec is None or spec == "":
        mix = dict(DEFAULT_MIX)
    elif isinstance(spec, Mapping):
        mix = {str(k): float(v) for k, v in spec.items()}
    else:
        mix = {}
        for part in str(spec).split(","):
            name, _, weight = part.partition("=")
            try:
                mix[name.strip()] = float(weight)
            except ValueError:
                raise ValueError(f"mid-training mix: expected NAME=WEIGHT, got {part!r} in {spec!r}.") from None
    unknown = sorted(set(mix) - set(MID_TASKS))
    if unknown:
        raise ValueError(f"mid-training mix: unknown tasks {unknown}; tasks are {list(MID_TASKS)}.")
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError(f"mid-training mix: weights must be >= 0 and not all 0, got {mix}.")
    return {k: v / total for k, v in mix.items() if v > 0}


@dataclass(frozen=True)
class ItemPool:
    """What the list and ``next`` tasks draw from: training sequences restricted to items with an SID (two items or
    more), and the sorted catalogue of their items.

    Built once per run (:meth:`build`) and passed to every :func:`build_midtraining_rows` call: rebuilding it from
    ~22k training sequences took 0.07-0.1 s, ~15% of a cpu-preset mid step's wall time.
    """

    sequences: tuple[tuple[int, ...], ...]
    catalog: tuple[int, ...]

    @classmethod
    def build(cls, train_sequences: Mapping[int, Sequence[int]], sids: SemanticIds) -> ItemPool:
        seqs = [tuple(i for i in s if i in sids) for s in train_sequences.values()]
        seqs = [s for s in seqs if len(s) >= 2]
        return cls(tuple(seqs), tuple(sorted({i for s in seqs for i in s})))


def _list_prompt(instruction: str, items: Sequence[Any], with_ids: bool = False) -> str:
    # No system line or output spec: they are constant, and every token costs compute that copying needs more.
    lines = [instruction, CANDIDATES_HEADER, *(it.render() for it in items)]
    return "\n".join([*lines, format_id_line([it.sid for it in items])] if with_ids else lines)


def build_midtraining_rows(
    train_sequences: Mapping[int, Sequence[int]],
    sids: SemanticIds,
    n_rows: int,
    n_candidates: int = 10,
    max_history: int = 10,
    mix: str | Mapping[str, float] | None = None,
    seed: int = 0,
    with_id_line: bool = False,
    rerank_rows: Sequence[Mapping[str, Any]] | None = None,
    pool: ItemPool | None = None,
) -> list[dict[str, Any]]:
    """``n_rows`` seeded ``{"prompt", "completion", "task"}`` rows of the mid-training tasks (module docstring).

    Args:
        train_sequences: ``{user: [item, ...]}`` training items in time order (``load_train_sequences``).
        sids: the semantic IDs (items without one are skipped).
        n_candidates: list length of the list tasks (the re-ranker's candidate count).
        max_history: history items shown by the ``next`` task.
        mix: task weights (:func:`parse_task_mix`).
        with_id_line: end the list tasks' prompts with the candidates' ID line (:func:`~.prompts.format_id_line`).
        rerank_rows: ``{"prompt", "completion"}`` re-ranking training rows the ``rerank`` and ``promote`` tasks draw
            from.
        pool: ``ItemPool.build(train_sequences, sids)``, when the caller builds many batches from the same data
            (``train_sequences`` is then not read).
    """
    weights = parse_task_mix(mix)
    for task in ("rerank", "promote"):
        if task in weights and not rerank_rows:
            raise ValueError(f"mid-training mix: the {task!r} task needs rerank_rows (the prepared train split's rows).")
    rng = random.Random(seed)
    pool = pool if pool is not None else ItemPool.build(train_sequences, sids)
    seqs, catalog = pool.sequences, pool.catalog
    if len(catalog) < n_candidates + 1:
        raise ValueError(f"mid-training needs at least {n_candidates + 1} training items with SIDs, got {len(catalog)}.")
    names, probs = zip(*weights.items())
    rows = []
    for _ in range(n_rows):
        task = rng.choices(names, probs)[0]
        if task in ("front", "repeat", "drop"):
            items = to_items(rng.sample(catalog, n_candidates), sids.encode, sids.attribute_tokens)
            order = [it.sid for it in items]
            if task == "repeat":
                prompt = _list_prompt("Repeat the candidates in order.", items, with_id_line)
                completion = format_completion("Keep the order.", order)
            else:
                pick = rng.randrange(n_candidates)
                named = order[pick]
                rest = [s for s in order if s != named]
                if task == "front":
                    prompt = _list_prompt(f"Move {named} to the front.", items, with_id_line)
                    completion = format_completion(f"So {named} ranks first. The rest keep pre-rank order.",
                                                   [named, *rest])
                else:
                    prompt = _list_prompt(f"Drop {named}.", items, with_id_line)
                    completion = format_completion(f"Without {named}.", rest)
        elif task == "rerank":
            row = rerank_rows[rng.randrange(len(rerank_rows))]
            prompt, completion = row["prompt"], row["completion"]
        elif task == "promote":
            prompt = rerank_rows[rng.randrange(len(rerank_rows))]["prompt"]
            shown = [c.sid for c in parse_prompt(prompt)[1]]
            completion = offline_completion(prompt, shown[rng.randrange(1, len(shown))])
        elif task == "next":
            seq = rng.choice(seqs)
            cut = rng.randrange(1, len(seq))
            history = to_items(seq[:cut][-max_history:], sids.encode, sids.attribute_tokens)
            prompt = "\n".join(["Predict the next item.", HISTORY_HEADER, *(it.render() for it in history)])
            completion = sids.encode(seq[cut])
        else:
            item = rng.choice(catalog)
            prompt = "\n".join(["Item attributes:", sids.encode(item)])
            completion = "".join(sids.attribute_tokens(item)) or "none"
        rows.append({"prompt": prompt, "completion": completion, "task": task})
    return rows
