"""Strict parsing of re-ranking completions (the scores built on it are in :mod:`diffgr2_trl.rerank.scoring`).

:func:`parse_ranking` accepts a completion only when it is the JSON object
``{"explanation": <str>, "recommendations": [<str>, ...]}`` (exactly these keys, in this order) and the
recommendations are a permutation of the candidates. No partial credit: a ranking with one bad ID is invalid as a
whole, because rewarding partial parses is a known reward hack for re-rankers.

Error labels, one per input, by precedence (the first that applies wins):

1. ``"unparseable"``: not that JSON object (bad JSON, extra text or keys, wrong key order, non-string entries), or
   the candidate list itself is malformed;
2. ``"dropped_candidate"``: fewer IDs than candidates, all of them distinct candidates (a pure omission, e.g. a
   list cut short);
3. ``"wrong_count"``: any other length mismatch;
4. ``"out_of_set_id"``: right length, but an ID that is not a candidate (hallucinated or malformed);
5. ``"duplicate_id"``: right length, all IDs are candidates, one repeats.

Counting comes first because the number of answer slots is what a block-diffusion model must get right before
anything else; with the right length, an in-set list without repeats is necessarily a permutation.

Accepted slack: surrounding whitespace, one or more trailing EOS strings, and conversational completions (a list of
messages: the last assistant message's content is parsed). Parsing never raises on what a model or dataset can
produce; an internal error (a bug) propagates instead of being counted as an unparseable completion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ERRORS: tuple[str, ...] = ("unparseable", "dropped_candidate", "wrong_count", "out_of_set_id", "duplicate_id")
DEFAULT_EOS: tuple[str, ...] = ("<eos>", "</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
# Completions longer than this are rejected unread: no real ranking is this long, and json.loads on adversarial
# megabyte inputs would only cost time inside a reward function.
MAX_CHARS = 200_000
_KEYS = ["explanation", "recommendations"]


@dataclass(frozen=True)
class ParseResult:
    """``ranking``: the parsed permutation (None unless valid); ``error``: None or one of :data:`ERRORS`.

    ``explanation`` is filled whenever the JSON schema parsed, even if the ranking is invalid.
    """

    ranking: list[str] | None
    error: str | None
    explanation: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def completion_text(completion: Any) -> str | None:
    """The text of a completion: a string, or the content of the last assistant message of a conversation.

    Message content may be a string or a list of ``{"type": "text", "text": ...}`` parts. Returns None if no text.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence) or isinstance(completion, bytes | bytearray):
        return None
    for message in reversed(completion):
        if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
                parts = [p.get("text") for p in content if isinstance(p, Mapping)]
                if parts and all(isinstance(p, str) for p in parts):
                    return "".join(parts)
            return None
    return None


def strip_eos(text: str, eos: Sequence[str] = DEFAULT_EOS) -> str:
    """Remove surrounding whitespace and any trailing run of EOS strings."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for tok in eos:
            if tok and text.endswith(tok):
                text = text[: -len(tok)].rstrip()
                changed = True
    return text


class _Object(list):
    """A JSON object as its (key, value) pairs: keeps key order and duplicate keys visible (a dict would silently
    keep the last duplicate), and cannot be confused with a JSON array."""


def _ordered_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    return _Object(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_ranking(text: Any, candidates: Any, eos: Sequence[str] = DEFAULT_EOS) -> ParseResult:
    """Parse a completion (string or messages) into a ranking of ``candidates`` (SID strings, pre-rank order).

    Any completion and any candidate list get a :class:`ParseResult`; an exception can only come from a bug in the
    parser (or a non-string ``eos``), and propagates rather than passing for an "unparseable" completion.
    """
    if isinstance(candidates, str | bytes) or not isinstance(candidates, Sequence):
        return ParseResult(None, "unparseable")
    candidates = list(candidates)
    if not candidates or not all(isinstance(c, str) for c in candidates) or len(set(candidates)) != len(candidates):
        return ParseResult(None, "unparseable")
    text = completion_text(text)
    if text is None or len(text) > MAX_CHARS:
        return ParseResult(None, "unparseable")
    try:
        obj = json.loads(strip_eos(text, eos), object_pairs_hook=_ordered_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return ParseResult(None, "unparseable")
    if not isinstance(obj, _Object) or [k for k, _ in obj] != _KEYS:
        return ParseResult(None, "unparseable")
    explanation, recs = obj[0][1], obj[1][1]
    if not isinstance(explanation, str) or type(recs) is not list or not all(isinstance(r, str) for r in recs):
        return ParseResult(None, "unparseable")

    cand_set = set(candidates)
    in_set = all(r in cand_set for r in recs)
    distinct = len(set(recs)) == len(recs)
    if len(recs) != len(candidates):
        error = "dropped_candidate" if len(recs) < len(candidates) and in_set and distinct else "wrong_count"
        return ParseResult(None, error, explanation)
    if not in_set:
        return ParseResult(None, "out_of_set_id", explanation)
    if not distinct:
        return ParseResult(None, "duplicate_id", explanation)
    return ParseResult(recs, None, explanation)


def is_canonical(text: Any, eos: Sequence[str] = DEFAULT_EOS) -> bool:
    """Whether a completion is byte-for-byte the form :func:`~diffgr2_trl.rerank.prompts.format_completion` writes
    (modulo surrounding whitespace / EOS). Stricter than parsing: no whitespace or escaping variants."""
    from diffgr2_trl.rerank.prompts import format_completion

    text = completion_text(text)
    if text is None or len(text) > MAX_CHARS:
        return False
    try:
        obj = json.loads(strip_eos(text, eos), object_pairs_hook=_ordered_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # not JSON; any other exception is a bug and propagates
        return False
    if not isinstance(obj, _Object) or [k for k, _ in obj] != _KEYS or type(obj[1][1]) is not list:
        return False
    if not isinstance(obj[0][1], str) or not all(isinstance(r, str) for r in obj[1][1]):
        return False
    return format_completion(obj[0][1], obj[1][1]) == strip_eos(text, eos)
