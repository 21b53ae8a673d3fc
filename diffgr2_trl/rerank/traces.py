"""Reasoning traces for the re-ranking completions: a deterministic offline writer and an LLM writer.

Training target. The only label is the true next item, so the target ranking is **the true next item first, the
other candidates in pre-rank order** (:func:`~diffgr2_trl.rerank.prompts.target_ranking`): the minimal edit of the
input that is right about the label; any other reordering of the rest would be invented.

Offline traces (:func:`offline_explanation`) use only what the prompt shows: the attribute tokens (brand /
category ids) each candidate shares with the history items, how recently those items were bought, and the pre-rank
position. They cite items by semantic ID in a few numbered steps and end by justifying the item ranked first, so the
reasoning always supports the answer that follows it (~100-150 tokens with the local tokenizer).

LLM traces (:class:`LLMTraceWriter`) ask any OpenAI-compatible ``/v1/completions`` endpoint (a vLLM server, say) for
``n`` samples per prompt and keep one by rejection sampling on the rank reward: the best valid sample that promotes
the target (or keeps it first when it already was); otherwise the offline trace is used.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diffgr2_trl.rerank.evidence import AttributeRarity, EvidenceRanker, grouped_ranking, strongest_link
from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.prompts import ItemText, format_completion, parse_prompt, target_ranking
from diffgr2_trl.rerank.scoring import rank_promotion_score

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Offline traces
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Evidence:
    position: int  # pre-rank position (0 = first)
    matches: list[tuple[int, ItemText, tuple[str, ...]]] = field(default_factory=list)  # (steps ago, item, shared)

    @property
    def strength(self) -> tuple[int, int]:
        # More matching history items first, then the most recent match.
        return (len(self.matches), -min((m[0] for m in self.matches), default=10**9))


def _by_evidence(evidence: dict[str, _Evidence]):
    """Sort key of the offline writer's preference: more matching history items, the most recent match, then the
    earlier pre-rank position."""
    return lambda sid: (evidence[sid].strength, -evidence[sid].position)


def _ago(steps: int) -> str:
    return "last" if steps == 0 else f"{steps + 1} back"


def _evidence(history: Sequence[ItemText], candidates: Sequence[ItemText]) -> dict[str, _Evidence]:
    out = {}
    for pos, cand in enumerate(candidates):
        ev = _Evidence(pos)
        for j, item in enumerate(history):
            shared = tuple(a for a in dict.fromkeys(cand.attrs) if a in item.attrs)
            if shared:
                ev.matches.append((len(history) - 1 - j, item, shared))
        ev.matches.sort(key=lambda m: m[0])  # most recent first
        out[cand.sid] = ev
    return out


def _describe(sid: str, ev: _Evidence) -> str:
    steps, item, shared = ev.matches[0]
    more = f", {len(ev.matches)} matches" if len(ev.matches) > 1 else ""
    return f"{sid} shares {''.join(shared)} with {item.sid} ({_ago(steps)}{more})"


def offline_explanation(
    history: Sequence[ItemText],
    candidates: Sequence[ItemText],
    ranking: Sequence[str],
    max_cited: int = 2,
    cite_others_by: str = "sid",
) -> str:
    """A deterministic multi-step explanation, from the prompt's evidence alone, that supports ``ranking[0]``.

    Args:
        history: the history items as shown in the prompt (oldest first).
        candidates: the candidates in pre-rank order.
        ranking: the final ranking (its first item is the one the explanation argues for).
        max_cited: how many other candidates with evidence the second step discusses.
        cite_others_by: ``"sid"`` cites every candidate by its semantic ID; ``"position"`` cites the candidates other
            than ``ranking[0]`` by pre-rank position (``candidate 3``), so the only candidate ID the explanation
            writes is the one the answer puts first ("skip an ID already written" is then the whole drop rule).
    """
    if cite_others_by not in ("sid", "position"):
        raise ValueError(f"cite_others_by must be 'sid' or 'position', got {cite_others_by!r}.")

    def name(sid: str, ev: _Evidence) -> str:
        return f"candidate {ev.position + 1}" if cite_others_by == "position" and sid != ranking[0] else sid

    evidence = _evidence(history, candidates)
    top = ranking[0]
    top_ev = evidence.get(top, _Evidence(len(candidates)))
    steps = []

    counts = Counter(a for item in history for a in dict.fromkeys(item.attrs))
    recurring = [(a, n) for a, n in counts.most_common(2) if n > 1]
    if recurring:
        themes = " and ".join(f"{a} ({n}/{len(history)})" for a, n in recurring)
        steps.append(f"1) History: {themes} recur; last bought {history[-1].sid}.")
    elif history:
        steps.append(f"1) History: no brand/category repeats; last bought {history[-1].sid}.")
    else:
        steps.append("1) History: empty, so only the pre-rank order informs the choice.")

    others = sorted(
        (sid for sid, ev in evidence.items() if sid != top and ev.matches),
        key=_by_evidence(evidence),
        reverse=True,
    )[:max_cited]
    n_none = sum(1 for ev in evidence.values() if not ev.matches)
    if others:
        cited = "; ".join(_describe(name(s, evidence[s]), evidence[s]) for s in others)
        steps.append(f"2) Evidence: {cited}; {n_none} of {len(candidates)} candidates share nothing.")
    else:
        steps.append(
            f"2) Evidence: no other candidate shares a brand/category with the history ({n_none} share none)."
        )

    steps.append(
        f"3) Pre-rank puts {name(candidates[0].sid, evidence[candidates[0].sid])} first."
        if candidates
        else "3) No pre-rank order is given."
    )

    where = f"pre-ranked {top_ev.position + 1}" if top_ev.position < len(candidates) else "not pre-ranked"
    if top_ev.matches:
        why = f"{_describe(top, top_ev)}, the most plausible next purchase"
    elif top_ev.position == 0:
        why = "no attribute link beats the pre-ranker's top pick"
    else:
        why = f"it brings {''.join(dict.fromkeys(_attrs(candidates, top))) or 'a new item'}, new to this user, a likely next step"
    steps.append(f"4) So {top} ranks first ({where}): {why}. The rest keep pre-rank order.")
    return " ".join(steps)


def _attrs(candidates: Sequence[ItemText], sid: str) -> tuple[str, ...]:
    return next((c.attrs for c in candidates if c.sid == sid), ())


TARGET_RULES = ("label", "supported", "evidence")


# ----------------------------------------------------------------------------------------------------------------
# Evidence traces: the ranking follows from the prompt (targets="evidence")
# ----------------------------------------------------------------------------------------------------------------

_ENTRY_RE = re.compile(r"(<a_\d+><b_\d+><c_\d+><d_\d+>) (none|<attr_\d+>(?:<rare_\d+>)? (?:last|\d+ back)) L(\d+)")


def link_text(history: Sequence[ItemText], cand: ItemText, rarity: AttributeRarity) -> str:
    """How an evidence trace writes a candidate's link: ``"<token> last"``, ``"<token> 3 back"`` or ``"none"``."""
    link = strongest_link(history, cand, rarity)
    return "none" if link is None else f"{link[0]} {'last' if link[1] == 0 else f'{link[1] + 1} back'}"


def evidence_explanation(history: Sequence[ItemText], candidates: Sequence[ItemText], levels: Sequence[int],
                         rarity: AttributeRarity) -> str:
    """The trace of an evidence ranking: every candidate, in pre-rank order, with the rarest attribute token it shares
    with the history (and how far back), then its level; the ranking that follows is those candidates grouped by level,
    highest first, pre-rank order inside a level (:func:`~diffgr2_trl.rerank.evidence.grouped_ranking`).

    Everything it writes is copied from the prompt except the levels, so the answer is a copy of an order the trace
    has already written. :func:`explanation_levels` reads the levels back; the two never disagree (tested).
    """
    if len(levels) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(levels)} levels.")
    last = f"last bought {history[-1].sid}" if history else "no history"
    entries = []
    for cand, level in zip(candidates, levels):
        entries.append(f"{cand.sid} {link_text(history, cand, rarity)} L{level}")
    order = ", then ".join(f"L{lv}" for lv in sorted(set(levels), reverse=True))
    return f"1) History: {last}. 2) Links: {'; '.join(entries)}. 3) Rank {order}, pre-rank order within each."


def explanation_levels(explanation: str) -> dict[str, int]:
    """The level :func:`evidence_explanation` gave each candidate, read back from its text (``{sid: level}``)."""
    return {sid: int(level) for sid, _, level in _ENTRY_RE.findall(explanation)}


def explanation_links(explanation: str) -> dict[str, tuple[str, int]]:
    """``{sid: (link text, level)}`` of each candidate an evidence trace lists (:func:`link_text`)."""
    return {sid: (where, int(level)) for sid, where, level in _ENTRY_RE.findall(explanation)}


def evidence_completion(history: Sequence[ItemText], candidates: Sequence[ItemText], ranker: EvidenceRanker,
                        fold: int | None = None, levels: Sequence[int] | None = None) -> tuple[str, list[str]]:
    """``(completion, ranking)`` of one prompt under ``ranker`` (``fold``: a cross-fitting model, for train rows;
    ``levels``: the candidates' levels when already computed, e.g. by :meth:`EvidenceRanker.scores_many`)."""
    if levels is None:
        levels = ranker.levels(history, candidates, fold)
    ranking = grouped_ranking([c.sid for c in candidates], levels)
    return format_completion(evidence_explanation(history, candidates, levels, ranker.rarity), ranking), ranking



def supported_ranking(history: Sequence[ItemText], candidates: Sequence[ItemText], target: str) -> list[str]:
    """The target first where the prompt's evidence singles it out, else the pre-rank order (``targets="supported"``).

    The evidence writer of :func:`offline_explanation` would put first the candidate sharing brand/category tokens
    with the most history items (ties: the most recent match, then pre-rank order). Rejection sampling on the rank
    reward, as GR2 keeps LLM traces: that proposal is kept when it is the target (rank reward > 0), otherwise the
    pre-rank order (reward 0) beats it, since promoting another candidate demotes the target (reward < 0). So the
    model only ever learns promotions the prompt supports; an oracle trace (``"label"``) also promotes targets that
    no evidence points to (two rows in three here), which a small model can only imitate as a guess.
    """
    order = [c.sid for c in candidates]
    if target not in order:
        raise ValueError(f"Target {target!r} is not among the candidates.")
    evidence = _evidence(history, candidates)
    best = max(order, key=_by_evidence(evidence))
    return target_ranking(order, target) if best == target else order


def offline_completion(prompt: str | Sequence[Mapping[str, Any]], target: str) -> str:
    """The full training completion for a prompt: offline explanation + target ranking, canonical form."""
    history, candidates = parse_prompt(prompt)
    ranking = target_ranking([c.sid for c in candidates], target)
    return format_completion(offline_explanation(history, candidates, ranking), ranking)


# ----------------------------------------------------------------------------------------------------------------
# LLM traces
# ----------------------------------------------------------------------------------------------------------------


class ServerUnavailableError(RuntimeError):
    """The OpenAI-compatible server cannot be reached (not started, wrong URL, crashed)."""


@dataclass
class TraceResult:
    """One kept completion. ``source`` is ``"llm"`` or ``"offline"`` (fallback); ``reward`` is the kept sample's rank
    reward (None for the offline fallback); ``error`` says why the request failed, if it did."""

    completion: str
    explanation: str
    ranking: list[str]
    source: str
    reward: float | None
    n_samples: int
    n_valid: int
    error: str | None = None


class _RetryableError(RuntimeError):
    pass


class LLMTraceWriter:
    """Sample traces from an OpenAI-compatible ``/v1/completions`` endpoint and keep them by rejection sampling.

    Args:
        base_url: server root, e.g. ``"http://127.0.0.1:8000"`` (a trailing ``/v1`` is accepted too).
        model: the model name the server serves (``--served-model-name`` / the path it was started with).
        n: samples per prompt (one request with ``n``).
        timeout: seconds per HTTP request. ``max_retries`` retries on connection errors, timeouts, 429 and 5xx,
            sleeping ``backoff * 2**attempt`` seconds in between. A prompt whose retries run out falls back to its
            offline trace (counted in ``failed_prompts``, its :class:`TraceResult` says why); any other error, a
            client error (4xx but 429: a wrong model name, a bad key or option) included, stops the run: it would
            fail every prompt alike.
        concurrency: requests in flight at most.
        prompt_suffix: appended to every prompt (e.g. ``'\\n{"explanation": "'`` to start the answer); the returned
            text is parsed with the suffix prepended.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        n: int = 4,
        max_tokens: int = 384,
        temperature: float = 0.8,
        top_p: float = 0.95,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 8,
        api_key: str | None = None,
        stop: Sequence[str] | None = None,
        prompt_suffix: str = "",
        seed: int | None = None,
    ):
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model, self.n, self.max_tokens = model, n, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.concurrency = max(1, concurrency)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.stop, self.prompt_suffix = list(stop) if stop else None, prompt_suffix
        import threading

        self.failed_prompts = 0  # prompts that fell back to the offline trace after transient request failures
        self._count_lock = threading.Lock()

    def check_server(self) -> None:
        """Raise :class:`ServerUnavailableError` with a clear message unless ``GET /v1/models`` answers."""
        import requests

        url = f"{self.base_url}/v1/models"
        try:
            resp = requests.get(url, headers=self.headers, timeout=min(self.timeout, 10.0))
            resp.raise_for_status()
        except requests.RequestException as err:
            raise ServerUnavailableError(
                f"No OpenAI-compatible server answers at {url} ({err.__class__.__name__}: {err}). Start one, e.g. "
                f"`python -m vllm.entrypoints.openai.api_server --model {self.model} --port 8000`, "
                "and pass its URL as base_url."
            ) from err

    def sample(self, prompt: str) -> list[str]:
        """``n`` completions for one prompt (retries with exponential backoff; raises after the last one)."""
        import requests

        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt + self.prompt_suffix,
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        url = f"{self.base_url}/v1/completions"
        for attempt in range(self.max_retries + 1):
            try:
                resp = requests.post(url, json=body, headers=self.headers, timeout=self.timeout)
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise _RetryableError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                if resp.status_code >= 400:
                    from diffgr2_trl.errors import UserError

                    raise UserError(
                        f"{url} refused the request for model {self.model!r} with HTTP {resp.status_code}: "
                        f"{resp.text[:200]}. Client errors are neither retried nor replaced by offline traces; "
                        "check the model name (the name the vLLM server serves), the API key and the options.")
                choices = sorted(resp.json()["choices"], key=lambda c: c.get("index", 0))
                return [self.prompt_suffix + str(c.get("text", "")) for c in choices]
            except (requests.ConnectionError, requests.Timeout, _RetryableError) as err:
                if attempt == self.max_retries:
                    raise
                delay = self.backoff * 2**attempt
                logger.warning("Completion request failed (%s); retry %d in %.1fs.", err, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def select(self, samples: Sequence[str], candidates: Sequence[str], target: str) -> tuple[int, float] | None:
        """Index and rank reward of the sample to keep, or None. A sample is acceptable when its ranking is valid and
        either promotes the target (rank reward > 0) or keeps it first; the highest reward wins (first on ties)."""
        best = None
        for i, text in enumerate(samples):
            parsed = parse_ranking(text, candidates)
            if not parsed.valid:
                continue
            reward = rank_promotion_score(parsed.ranking, candidates, target)
            if (reward > 0 or parsed.ranking[0] == target) and (best is None or reward > best[1]):
                best = (i, reward)
        return best

    def _one(self, row: Mapping[str, Any]) -> TraceResult:
        import requests

        candidates, target = list(row["candidates"]), row["target"]
        samples: list[str] = []
        error = None
        try:
            prompt = row["prompt"]
            if not isinstance(prompt, str):  # messages: the completions endpoint takes text
                prompt = "\n".join(str(m.get("content", "")) for m in prompt)
            samples = self.sample(prompt)
        except (requests.ConnectionError, requests.Timeout, _RetryableError) as err:
            # transient and out of retries: this prompt falls back instead of killing the whole run
            error = f"{err.__class__.__name__}: {err}"
            with self._count_lock:
                self.failed_prompts += 1
            logger.warning("Falling back to the offline trace: %s", error)
        n_valid = sum(parse_ranking(s, candidates).valid for s in samples)
        choice = self.select(samples, candidates, target)
        if choice is not None:
            parsed = parse_ranking(samples[choice[0]], candidates)
            completion = format_completion(parsed.explanation or "", parsed.ranking)
            return TraceResult(
                completion, parsed.explanation or "", parsed.ranking, "llm", choice[1], len(samples), n_valid, error
            )
        history, cand_items = parse_prompt(row["prompt"])
        ranking = target_ranking(candidates, target)
        explanation = offline_explanation(history, cand_items, ranking)
        completion = format_completion(explanation, ranking)
        return TraceResult(completion, explanation, ranking, "offline", None, len(samples), n_valid, error)

    def write(self, rows: Sequence[Mapping[str, Any]], check: bool = True) -> list[TraceResult]:
        """One :class:`TraceResult` per row (``prompt`` as a string, ``candidates``, ``target``), in row order.

        With ``check`` the server is probed first, so a server that is down fails fast with a clear error instead of
        after every prompt's retries.
        """
        if check:
            self.check_server()
        before = self.failed_prompts
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(self._one, rows))
        if self.failed_prompts > before:
            logger.warning("%d of %d prompts fell back to offline traces after failed requests.",
                           self.failed_prompts - before, len(rows))
        return results
