"""Prompt and target formatting for the GR2 re-ranking task.

A prompt holds an instruction, the user's history (oldest first) and the 10 candidates in pre-rank order, each item
written as its semantic ID followed by its attribute tokens, e.g. ``<a_12><b_7><c_190><d_3><attr_4><attr_31>``. No
titles exist offline, so attribute tokens (brand / category ids) are the only readable evidence an item carries.

With ``id_line=True`` (the default) the candidates are followed by one more line that writes their IDs exactly as the
answer writes them, ``IDs: ["<a_1><b_2><c_3><d_4>", "<a_5><b_6><c_7><d_8>", ...]``: the answer list can then be
copied token after token, without skipping over attribute tokens. A small model trained from scratch learns to copy
candidates several times sooner with it (``results/copy_learning.md``).

The completion is one JSON object with a fixed key order, explanation first so the reasoning precedes the answer::

    {"explanation": "...", "recommendations": ["<a_1><b_2><c_3><d_4>", "<a_5><b_6><c_7><d_8>", ...]}

A block-diffusion model denoises the answer positions in parallel, so the answer is kept rigidly regular: one fixed
separator (``", "``) between IDs, no whitespace variants, and JSON escaping guarantees an unescaped ``"`` only ever
appears in those structural pieces (the local tokenizer makes each of them a single token).

Items are given as :class:`ItemText` (SID + attribute tokens). The row contract shared with ``rerank.data`` is
``{"user_id": int, "history": list[int], "candidates": list[int], "target": int}``; :func:`build_rerank_row` turns such
an example into dataset columns, given any mapping or callable from item id to SID string and attribute tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SID_LEVELS: tuple[str, ...] = ("a", "b", "c", "d")
SID_RE = re.compile(r"<a_\d+><b_\d+><c_\d+><d_\d+>")
ATTR_RE = re.compile(r"<attr_\d+>(?:<rare_\d+>)?")  # with its rarity mark, if the prompt writes them

# Structural pieces of the completion. `SEPARATOR` is the one and only separator between IDs.
EXPLANATION_OPEN = '{"explanation": "'
RECOMMENDATIONS_OPEN = '", "recommendations": ["'
SEPARATOR = '", "'
CLOSE = '"]}'
FORMAT_PIECES: tuple[str, ...] = (EXPLANATION_OPEN, RECOMMENDATIONS_OPEN, SEPARATOR, CLOSE)

SYSTEM_PROMPT = "You are a re-ranking assistant for an online store."  # when the dataset's store is not known


def system_prompt(store: str | None = None) -> str:
    """The role line, naming what the store sells (the dataset's name, e.g. ``Toys_and_Games`` -> "a Toys and Games
    store"); :data:`SYSTEM_PROMPT` when ``store`` is ``None``."""
    if not store:
        return SYSTEM_PROMPT
    return f"You are a re-ranking assistant for a {' '.join(store.replace('_', ' ').split())} store."
INSTRUCTION = (
    "Rank the candidates by how likely the user buys each next. Items: semantic ID, then brand/category tokens."
)
HISTORY_HEADER = "History (oldest first):"
ID_LINE_PREFIX = 'IDs: ["'
CANDIDATES_HEADER = "Candidates (pre-rank order):"
# Shows the exact answer template, separator included, in as few tokens as possible.
OUTPUT_SPEC = (
    'Reply in JSON: {"explanation": "<steps citing IDs>", "recommendations": ["<ID>", "<ID>", ...]} '
    "with all {n} candidate IDs, best first."
)

SidLookup = Mapping[int, str] | Callable[[int], str]
AttrLookup = Mapping[int, Sequence[str]] | Callable[[int], Sequence[str]]


@dataclass(frozen=True)
class ItemText:
    """An item as the prompt shows it: its semantic ID and its attribute tokens."""

    sid: str
    attrs: tuple[str, ...] = ()

    def render(self) -> str:
        # No spaces: SID and attribute tokens are single added tokens, a space would add one token per attribute.
        return self.sid + "".join(self.attrs)


def _lookup(table: Mapping | Callable, key: int) -> Any:
    return table(key) if callable(table) else table[key]


def to_items(item_ids: Sequence[int], sid_of: SidLookup, attrs_of: AttrLookup | None = None) -> list[ItemText]:
    """Resolve item ids into :class:`ItemText` with any mapping or callable (no dependency on how SIDs are built)."""
    out = []
    for item in item_ids:
        attrs = tuple(_lookup(attrs_of, item)) if attrs_of is not None else ()
        out.append(ItemText(sid=_lookup(sid_of, item), attrs=attrs))
    return out


def _shown(history: Sequence[ItemText], max_history: int | None) -> list[ItemText]:
    if max_history is None:
        return list(history)
    return list(history)[-max_history:] if max_history > 0 else []


def format_id_line(sids: Sequence[str]) -> str:
    """``IDs: ["<sid>", "<sid>", ...]``: the IDs joined by the answer's own separator token (module docstring)."""
    return ID_LINE_PREFIX + SEPARATOR.join(sids) + '"]'


def build_prompt(history: Sequence[ItemText], candidates: Sequence[ItemText], max_history: int | None = 20,
                 id_line: bool = True, store: str | None = None) -> str:
    """The plain-text prompt (GR2 layout: role, instruction, history oldest first, candidates, output format).

    Args:
        history: the user's items, oldest first; only the last ``max_history`` are shown (``None``: all).
        candidates: the items to re-rank, in pre-rank order (best first).
        id_line: follow the candidates with :func:`format_id_line` of their IDs.
        store: what the store sells, for the role line (:func:`system_prompt`).
    """
    history = _shown(history, max_history)
    lines = [system_prompt(store), INSTRUCTION, HISTORY_HEADER]
    lines += [item.render() for item in history]
    lines.append(CANDIDATES_HEADER)
    lines += [item.render() for item in candidates]
    if id_line:
        lines.append(format_id_line([item.sid for item in candidates]))
    lines.append(OUTPUT_SPEC.replace("{n}", str(len(candidates))))
    return "\n".join(lines)


def build_messages(
    history: Sequence[ItemText], candidates: Sequence[ItemText], max_history: int | None = 20, id_line: bool = True,
    store: str | None = None,
) -> list[dict[str, str]]:
    """The conversational form of :func:`build_prompt` (a system and a user message), as TRL expects it."""
    user = build_prompt(history, candidates, max_history, id_line).split("\n", 1)[1]
    return [{"role": "system", "content": system_prompt(store)}, {"role": "user", "content": user}]


def parse_prompt(prompt: str | Sequence[Mapping[str, Any]]) -> tuple[list[ItemText], list[ItemText]]:
    """Recover (history, candidates) from a prompt built by :func:`build_prompt` or :func:`build_messages`.

    Lets the offline trace writer work from a dataset's ``prompt`` column alone.
    """
    if not isinstance(prompt, str):
        prompt = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))
    if HISTORY_HEADER not in prompt or CANDIDATES_HEADER not in prompt:
        raise ValueError(f"Not a re-ranking prompt: missing {HISTORY_HEADER!r} or {CANDIDATES_HEADER!r}.")
    history_part, rest = prompt.split(HISTORY_HEADER, 1)[1].split(CANDIDATES_HEADER, 1)

    def items(block: str) -> list[ItemText]:
        out = []
        for line in block.splitlines():
            sid = SID_RE.match(line.strip())
            if sid:
                out.append(ItemText(sid.group(0), tuple(ATTR_RE.findall(line[sid.end() :]))))
        return out

    return items(history_part), items(rest)


def format_completion(explanation: str, ranking: Sequence[str]) -> str:
    """The canonical completion; :func:`diffgr2_trl.rerank.parsing.parse_ranking` accepts exactly this form.

    ``json.dumps`` escapes the explanation, so quotes or newlines in it can never break the structure.
    """
    body = json.dumps(str(explanation), ensure_ascii=False)[1:-1]
    return EXPLANATION_OPEN + body + RECOMMENDATIONS_OPEN + SEPARATOR.join(ranking) + CLOSE


def target_ranking(candidates: Sequence[str], target: str) -> list[str]:
    """The training target ranking: the true next item first, the other candidates in pre-rank order.

    Keeping the rest in pre-rank order is the minimal edit of the input that is right about the only label we have.
    """
    if target not in candidates:
        raise ValueError(f"Target {target!r} is not among the candidates.")
    return [target] + [c for c in candidates if c != target]


def build_rerank_row(
    example: Mapping[str, Any],
    sid_of: SidLookup,
    attrs_of: AttrLookup | None = None,
    max_history: int | None = 20,
    conversational: bool = False,
    explanation: str | Callable[..., str] | None = None,
    id_line: bool = True,
    ranking: Callable[[Sequence[ItemText], Sequence[ItemText], str], list[str]] | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Turn a ``{"user_id", "history", "candidates", "target"}`` example into dataset columns.

    Returns ``prompt`` (str, or messages when ``conversational``), ``candidates`` (SIDs in pre-rank order) and
    ``target`` (SID): the columns the ``rewards`` functions read. With ``explanation`` (a string, or a callable
    ``f(history_items, candidate_items, ranking) -> str`` such as ``traces.offline_explanation``) it also adds a
    ``completion`` for SFT/CFT in the same form as the prompt. ``id_line``: see :func:`build_prompt`. ``ranking``
    (``f(history_items, candidate_items, target_sid) -> ranking``, e.g. ``traces.supported_ranking``) chooses the
    completion's ranking; default :func:`target_ranking`. ``store``: see :func:`system_prompt`.
    """
    history = to_items(example["history"], sid_of, attrs_of)
    cands = to_items(example["candidates"], sid_of, attrs_of)
    cand_sids = [c.sid for c in cands]
    target = _lookup(sid_of, example["target"])
    row: dict[str, Any] = {
        "prompt": build_messages(history, cands, max_history, id_line, store)
        if conversational
        else build_prompt(history, cands, max_history, id_line, store),
        "candidates": cand_sids,
        "target": target,
    }
    if explanation is not None:
        shown = _shown(history, max_history)
        order = ranking(shown, cands, target) if ranking is not None else target_ranking(cand_sids, target)
        text = explanation(shown, cands, order) if callable(explanation) else explanation
        completion = format_completion(text, order)
        row["completion"] = [{"role": "assistant", "content": completion}] if conversational else completion
    return row
