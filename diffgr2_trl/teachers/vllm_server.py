"""Teacher behind a vLLM OpenAI-compatible server: ``/v1/completions`` with token-id prompts and ``prompt_logprobs``.

Why not TRL's ``trl.generation.vllm_client.VLLMClient.get_sequence_logprobs``? It does speak this very endpoint (it
works against a plain ``vllm serve``), but three of its behaviours are wrong for a distillation teacher:

- it pads a position with ``-inf`` when the actual token is missing and silently returns fewer positions when the
  server answers short, where a teacher must fail loudly;
- its urllib3 retry policy is fixed (5 retries, backoff 2 s: about a minute before a dead server is reported, with
  a generic error), where callers need a bounded, configurable retry and an error naming the URL;
- its constructor requires the ``vllm`` package and blocks on ``/health``, where a client of a remote server needs
  only HTTP.

So this is a small ``httpx`` client with the same request shape (``max_tokens=1``: vLLM rejects 0).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from tqdm.auto import tqdm

from .base import Teacher, TeacherResponseError, TeacherScores, TeacherUnavailableError

__all__ = ["VLLMServerTeacher", "parse_prompt_logprobs"]

# Status codes worth retrying: the server is (re)starting or overloaded. 4xx are the request's fault: no retry.
_RETRY_STATUS = {408, 429, 502, 503, 504}


def parse_prompt_logprobs(
    prompt_logprobs: Sequence[dict | None] | None,
    sequence: Sequence[int],
    start: int,
    top_k: int,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn vLLM's per-prompt-position dicts into ``(token_logprobs [Lc], topk_ids [Lc,k], topk_logprobs [Lc,k])``.

    vLLM returns, for each prompt position ``p``, a dict ``token_id -> {logprob, rank, ...}`` (ids as strings over
    HTTP, ``Logprob`` objects in-process) holding the actual token ``sequence[p]`` plus the ``top_k`` most probable
    tokens (``top_k`` or ``top_k + 1`` entries); position 0 is ``None``. Raises :class:`TeacherResponseError` on any
    missing position or entry instead of filling in a value.
    """
    if prompt_logprobs is None:
        raise TeacherResponseError(f"{where}: the response has no prompt_logprobs (was prompt_logprobs requested?).")
    if len(prompt_logprobs) < len(sequence):
        raise TeacherResponseError(
            f"{where}: the teacher returned prompt log-probs for {len(prompt_logprobs)} positions but the sequence has "
            f"{len(sequence)} tokens (completion starts at {start}); the server may have truncated the prompt."
        )
    n = len(sequence) - start
    token_lp = torch.empty(n, dtype=torch.float32)
    ids = torch.empty(n, top_k, dtype=torch.long)
    values = torch.empty(n, top_k, dtype=torch.float32)
    for j, p in enumerate(range(start, len(sequence))):
        entry = prompt_logprobs[p]
        if not entry:
            raise TeacherResponseError(f"{where}: no log-probs at prompt position {p}.")
        items = [(int(tid), _logprob(v), _rank(v)) for tid, v in entry.items()]
        actual = next((lp for tid, lp, _ in items if tid == sequence[p]), None)
        if actual is None:
            raise TeacherResponseError(f"{where}: position {p} lacks the log-prob of its actual token {sequence[p]}.")
        token_lp[j] = actual
        if top_k:
            items.sort(key=lambda x: x[2])
            top = [x for x in items if x[2] <= top_k][:top_k]
            if len(top) < top_k:
                raise TeacherResponseError(f"{where}: position {p} has {len(top)} top log-probs, expected {top_k}.")
            ids[j] = torch.tensor([x[0] for x in top])
            values[j] = torch.tensor([x[1] for x in top])
    return token_lp, ids, values


def _logprob(v) -> float:
    lp = v["logprob"] if isinstance(v, dict) else v.logprob
    return -math.inf if lp is None or math.isnan(lp) else float(lp)


def _rank(v) -> int:
    r = v["rank"] if isinstance(v, dict) else v.rank
    return int(r) if r is not None else 1 << 30


class VLLMServerTeacher(Teacher):
    """Score sequences on a running vLLM OpenAI-compatible server (``diffgr2 serve-teacher`` starts one).

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"`` (a trailing ``/v1`` is accepted).
        model_name: the served model name; default: the first model ``/v1/models`` lists.
        vocab_size: the teacher's vocabulary size; default: read from the served model's config when the server
            runs on this machine (its ``root`` is a local directory). Needed to refuse out-of-vocabulary ids.
        max_length: longest sequence accepted; default ``max_model_len - 1`` from ``/v1/models`` (vLLM needs room
            for the one token it must generate).
        max_top_k: the server's ``--max-logprobs`` if known (else the server's 400 answer is reported).
        request_batch_size: sequences per HTTP request (vLLM batches inside a request and across requests).
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: retries per request on connection errors and 408/429/502/503/504, with exponential backoff
            ``backoff * 2**attempt`` (capped at 30 s); then :class:`TeacherUnavailableError`.
        backoff: first backoff in seconds.
        forbidden_token_ids: ids that must never reach the teacher (see :class:`Teacher`).
        progress: progress bar over requests.
    """

    def __init__(
        self,
        base_url: str,
        model_name: str | None = None,
        vocab_size: int | None = None,
        max_length: int | None = None,
        max_top_k: int | None = None,
        request_batch_size: int = 8,
        max_concurrency: int = 4,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        forbidden_token_ids=None,
        progress: bool = False,
    ):
        super().__init__(forbidden_token_ids)
        base_url = base_url.rstrip("/")
        self.base_url = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
        self.request_batch_size = request_batch_size
        self.max_concurrency = max_concurrency
        self.retries, self.backoff, self.progress = retries, backoff, progress
        self.max_top_k = max_top_k
        self._client = httpx.Client(
            timeout=timeout, limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        )
        self._model_name, self._vocab_size, self._max_length = model_name, vocab_size, max_length
        self._info: dict | None = None
        self._lock = threading.Lock()

    # Metadata is resolved lazily so that building the teacher never blocks on, or fails for, a server still starting.
    def _model_info(self) -> dict:
        with self._lock:
            if self._info is None:
                data = self._request("GET", "/v1/models")["data"]
                if not data:
                    raise TeacherResponseError(f"The server at {self.base_url} serves no model.")
                by_id = {m["id"]: m for m in data}
                if self._model_name is not None and self._model_name not in by_id:
                    raise TeacherResponseError(f"The server at {self.base_url} does not serve {self._model_name!r}; it serves {sorted(by_id)}.")
                self._info = by_id[self._model_name] if self._model_name else data[0]
            return self._info

    def tokenizer_path(self) -> str | None:
        """The directory the server serves (``root`` in ``/v1/models``), when it exists on this machine."""
        root = self._model_info().get("root")
        return root if root and os.path.isdir(root) else None

    @property
    def model_name(self) -> str:
        return self._model_name or self._model_info()["id"]

    @property
    def max_length(self) -> int | None:  # type: ignore[override]
        if self._max_length is None:
            max_model_len = self._model_info().get("max_model_len")
            self._max_length = None if max_model_len is None else int(max_model_len) - 1
        return self._max_length

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        if self._vocab_size is None:
            root = self._model_info().get("root")
            if root and os.path.isdir(root):
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(root)
                config = getattr(config, "get_text_config", lambda: config)()
                self._vocab_size = int(config.vocab_size)
            else:
                raise TeacherResponseError(
                    f"Cannot tell the vocabulary size of the model served at {self.base_url} (root={root!r} is not a "
                    "local directory); pass vocab_size= to VLLMServerTeacher."
                )
        return self._vocab_size

    def _request(self, method: str, path: str, json: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        last: BaseException | str | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                response = self._client.request(method, url, json=json)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = exc
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code != 200:
                raise TeacherResponseError(f"{method} {url} failed with HTTP {response.status_code}: {response.text[:1000]}")
            return response.json()
        raise TeacherUnavailableError(url, self.retries + 1, last)

    def _score_chunk(self, sequences: list[list[int]], starts: list[int], top_k: int, offset: int):
        payload = {
            "model": self.model_name,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": top_k,
        }
        choices = self._request("POST", "/v1/completions", json=payload).get("choices") or []
        if len(choices) != len(sequences):
            raise TeacherResponseError(f"{self.base_url}: asked to score {len(sequences)} sequences, got {len(choices)} choices.")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        out = []
        for k, (choice, seq, start) in enumerate(zip(choices, sequences, starts)):
            where = f"{self.base_url} sequence {offset + k}"
            echoed = choice.get("prompt_token_ids")
            if echoed is not None and list(echoed) != seq:
                raise TeacherResponseError(f"{where}: the server scored other token ids than sent (truncated or re-tokenised prompt).")
            out.append(parse_prompt_logprobs(choice.get("prompt_logprobs"), seq, start, top_k, where))
        return out

    def _score(self, sequences, starts, top_k, full_vocab) -> TeacherScores:
        step = self.request_batch_size
        chunks = [(sequences[b : b + step], starts[b : b + step], top_k, b) for b in range(0, len(sequences), step)]
        results = []
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(chunks)))) as pool:
            for res in tqdm(pool.map(lambda c: self._score_chunk(*c), chunks), total=len(chunks), desc="vLLM teacher scoring", disable=not self.progress):
                results.extend(res)
        token_lp, ids, values = (list(x) for x in zip(*results))
        return TeacherScores(token_lp, ids, values, None)

    def close(self) -> None:
        self._client.close()
