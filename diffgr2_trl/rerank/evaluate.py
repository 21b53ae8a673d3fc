"""Evaluation of a generative re-ranker: decode, parse strictly, score R@k / N@k, validity and throughput.

Decoding is pluggable. A decode function has the signature::

    decode_fn(model, tokenizer, prompts: list[str], max_new_tokens: int, *, candidates=None)
        -> (texts: list[str], stats: dict)

``candidates`` (one list of candidate SIDs per prompt) is passed only for constrained decoding
(``evaluate_model(..., constrained=True)``): the decoder must then emit a valid permutation of them
(:mod:`diffgr2_trl.rerank.constraints`); both built-in decoders support it.

``stats`` may hold ``generated_tokens`` (tokens produced up to and including the stop token, summed over the batch)
and ``forward_passes`` (forwards each row took part in, summed over the batch); both are summed over batches, and
``tokens_per_forward`` is derived from them. :func:`ar_greedy_decode` (HF ``generate``, greedy, left padding) is the
default; :func:`make_block_decode` wraps :class:`~diffgr2_trl.block_diffusion.sampler.BlockDiffusionSampler`.
Any other decoder can be registered in :data:`DECODERS`.

Invalid outputs (the paper's protocol). A completion that the strict parser rejects
(:func:`~diffgr2_trl.rerank.parsing.parse_ranking`) **falls back to the pre-rank order** for the ranking metrics,
so an invalid output scores exactly what the pre-ranker scored on that example; it is counted in ``valid_rate`` and
in the per-category ``errors`` breakdown. A model that never emits a valid ranking therefore reproduces the floor
(Diffusion-GR2's "naive conversion" row), and any gain over the floor comes from valid re-rankings only.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..block_diffusion.attention import cpu_gqa_attention
from ..utils import write_json_atomic
from .metrics import summarize_ranks
from .parsing import ERRORS, parse_ranking

__all__ = [
    "DECODERS",
    "DecodeFn",
    "ar_greedy_decode",
    "evaluate_model",
    "make_block_decode",
    "score_outputs",
    "stop_token_ids",
    "write_json_atomic",
]

DecodeFn = Callable[[Any, Any, list[str], int], tuple[list[str], dict[str, Any]]]


def _count_until_stop(ids: torch.Tensor, stop_ids: set[int], pad_id: int | None) -> int:
    """Generated tokens of one row: up to and including the first stop token (all non-pad tokens otherwise)."""
    n = 0
    for t in ids.tolist():
        n += 1
        if t in stop_ids:
            return n
    if pad_id is not None:  # no stop token: trailing pads (if any) were not generated
        while n and ids[n - 1].item() == pad_id:
            n -= 1
    return n


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens AR decoding stops at: the model's generation (or config) EOS ids and the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or model.config.eos_token_id
    ids = set(eos if isinstance(eos, list | tuple) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _encode_left(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _constraints(tokenizer, candidates: Sequence[Sequence[str]] | None, max_length: int, stop: set[int]):
    """One ranking constraint per prompt, or None when unconstrained."""
    if candidates is None:
        return None
    from .constraints import RankingConstraint

    return RankingConstraint.for_rows(tokenizer, candidates, max_length, stop)


@torch.no_grad()
def ar_greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, *,
                     candidates: Sequence[Sequence[str]] | None = None,
                     compile: bool | dict = False) -> tuple[list[str], dict[str, Any]]:
    """Greedy AR decoding of a batch with HF ``generate`` (left padding, KV cache); one forward per token.

    With ``candidates``, decoding is constrained to valid rankings
    (:class:`~diffgr2_trl.rerank.constraints.RankingLogitsProcessor`). ``compile`` decodes with transformers' static
    cache and a ``torch.compile``d forward (``True``: mode ``reduce-overhead``, CUDA graphs on a GPU; or a dict of
    ``transformers.CompileConfig`` arguments): the fast AR baseline a speedup must be measured against.
    """
    from transformers import LogitsProcessorList

    enc = _encode_left(tokenizer, prompts, model.device)
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    constraints = _constraints(tokenizer, candidates, max_new_tokens, stop)
    processors = None
    if constraints is not None:
        from .constraints import RankingLogitsProcessor

        processors = LogitsProcessorList([RankingLogitsProcessor(constraints, enc["input_ids"].shape[1])])
    with cpu_gqa_attention(model):
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(stop),
            logits_processor=processors,
            **_compiled_generation(compile),
            # Greedy only: stop transformers from warning about (or applying) sampling knobs saved in a checkpoint.
            temperature=None,
            top_p=None,
            top_k=None,
        )
    gen = out[:, enc["input_ids"].shape[1] :]
    counts = [_count_until_stop(row, stop, pad) for row in gen]
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(gen, counts)], skip_special_tokens=False)
    return texts, {"generated_tokens": sum(counts), "forward_passes": sum(counts)}


def _compiled_generation(compile: bool | dict) -> dict[str, Any]:
    if not compile:
        return {}
    from transformers import CompileConfig

    config = CompileConfig(**({} if compile is True else dict(compile)))
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told otherwise
    return {"cache_implementation": "static", "compile_config": config}


def make_ar_decode(compile: bool | dict = False) -> DecodeFn:
    """:func:`ar_greedy_decode`, compiled (static cache + ``torch.compile``) when ``compile`` is set."""
    if not compile:
        return ar_greedy_decode

    def ar_compiled_decode(model, tokenizer, prompts, max_new_tokens, *, candidates=None):
        return ar_greedy_decode(model, tokenizer, prompts, max_new_tokens, candidates=candidates, compile=compile)

    return ar_compiled_decode


def make_block_decode(tau: float | None = None, config=None, **sampler_kwargs: Any) -> DecodeFn:
    """A decode function running :class:`BlockDiffusionSampler` (for converted block-diffusion models).

    ``config`` is a :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig` (default: its defaults); ``tau``, when
    given, overrides its threshold. The completion cap comes from each call (``evaluate_model``'s).
    """
    from diffgr2_trl.block_diffusion import BlockDecodingConfig

    config = config if config is not None else BlockDecodingConfig()
    if tau is not None:
        config = config.replace(tau=tau)

    @torch.no_grad()
    def block_decode(model, tokenizer, prompts: list[str], max_completion_length: int, *,
                     candidates: Sequence[Sequence[str]] | None = None):
        from diffgr2_trl.block_diffusion.sampler import BlockDiffusionSampler

        enc = _encode_left(tokenizer, prompts, model.device)
        sampler = BlockDiffusionSampler(model, config=config, **sampler_kwargs)
        stop = set(sampler.eos_token_ids) | set(config.stop_token_ids or []) | stop_token_ids(model, tokenizer)
        out = sampler.generate(
            enc["input_ids"], enc["attention_mask"], max_completion_length=max_completion_length,
            constraints=_constraints(tokenizer, candidates, max_completion_length, stop),
        )
        mask = out.completion_mask.bool()
        texts = tokenizer.batch_decode(
            [row[m] for row, m in zip(out.completion_ids, mask)], skip_special_tokens=False
        )
        return texts, {"generated_tokens": int(mask.sum()), "forward_passes": int(out.row_forward_passes.sum())}

    block_decode.__name__ = f"block_decode_tau{config.tau}"
    return block_decode


# name -> factory(**options) -> DecodeFn. ``evaluate --decoder NAME`` looks names up here.
DECODERS: dict[str, Callable[..., DecodeFn]] = {
    "ar": lambda **_: ar_greedy_decode,
    "ar_compiled": lambda compile=True, **_: make_ar_decode(compile=compile),
    "block": lambda tau=None, config=None, **_: make_block_decode(tau=tau, config=config),
}


def score_outputs(
    texts: Sequence[Any], candidates: Sequence[Sequence[str]], targets: Sequence[str]
) -> dict[str, Any]:
    """Metrics of decoded completions against their examples (pure: no model involved).

    Returns ``{"metrics": {R@1, R@3, R@5, N@3, N@5, valid_rate, errors, n}, "prerank": {...}, "ranks": [...]}``.
    An invalid completion falls back to the pre-rank order (see the module docstring); ``errors`` counts every
    error category of :data:`~diffgr2_trl.rerank.parsing.ERRORS` (zeros included, so breakdowns line up).
    """
    if not (len(texts) == len(candidates) == len(targets)):
        raise ValueError(f"Lengths differ: {len(texts)} texts, {len(candidates)} candidate lists, {len(targets)} targets.")
    ranks, pre_ranks, errors, valid = [], [], Counter({e: 0 for e in ERRORS}), 0
    for text, cands, target in zip(texts, candidates, targets):
        cands = list(cands)
        if target not in cands:
            raise ValueError(f"Target {target!r} is not among its candidates; evaluation examples must contain it.")
        parsed = parse_ranking(text, cands)
        pre_ranks.append(cands.index(target))
        if parsed.valid:
            valid += 1
            ranks.append(parsed.ranking.index(target))
        else:
            errors[parsed.error] += 1
            ranks.append(cands.index(target))  # fallback: the pre-rank order
    n = len(texts)
    metrics: dict[str, Any] = summarize_ranks(ranks)
    metrics.update(valid_rate=valid / n if n else 0.0, errors=dict(errors))
    return {"metrics": metrics, "prerank": summarize_ranks(pre_ranks), "ranks": ranks}


def evaluate_model(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    decode_fn: DecodeFn = ar_greedy_decode,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    progress: bool = True,
    keep_outputs: bool = False,
    constrained: bool = False,
    pool=None,
    given: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Decode ``rows`` (``prompt``, ``candidates``, ``target``) in batches and score them with :func:`score_outputs`.

    Prompts are decoded in order of length (less padding per batch); results come back in the input order.
    Adds ``generated_tokens``, ``mean_completion_tokens``, ``decode_seconds``, ``tokens_per_s`` and, when the decoder
    reports forwards, ``forward_passes`` / ``tokens_per_forward`` to ``metrics``. ``keep_outputs`` also returns the
    texts (``outputs``). ``constrained`` passes each row's candidates to ``decode_fn`` so it decodes valid rankings
    only (the decoder must accept a ``candidates`` keyword).

    ``pool`` (a :class:`~diffgr2_trl.rerank.workers.DecodePool`) decodes the batches in its child processes, and
    with ``model`` and ``decode_fn`` in this process too (both None: in the children only); the batches are the same.
    ``given`` maps row indices to completions already known (e.g. reused from another pass): those rows are scored,
    not decoded, and the speed figures (over ``decoded_rows`` rows) cover the decoded rows only.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("Nothing to evaluate: no rows.")
    if decode_fn is not None and constrained and "candidates" not in inspect.signature(decode_fn).parameters:
        name = getattr(decode_fn, "__name__", "decode_fn")
        raise ValueError(f"{name} does not support constrained decoding: it takes no 'candidates' keyword.")
    prompts = [r["prompt"] for r in rows]
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("evaluate_model expects plain-text prompts (the 'prompt' column of diffgr2 prepare).")
    given = dict(given or {})
    if any(not 0 <= i < len(rows) for i in given):
        raise ValueError(f"given holds row indices outside 0..{len(rows) - 1}.")
    texts: list[str | None] = [given.get(i) for i in range(len(rows))]
    order = sorted((i for i in range(len(rows)) if i not in given), key=lambda i: len(prompts[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    work = [([prompts[i] for i in idx], [list(rows[i]["candidates"]) for i in idx] if constrained else None)
            for idx in batches]
    totals: Counter = Counter()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()

    def here(batch_prompts: list[str], candidates: list | None) -> tuple[list[str], dict]:
        extra = {"candidates": candidates} if constrained else {}
        return decode_fn(model, tokenizer, batch_prompts, max_new_tokens, **extra)

    if pool is None:
        name, decoded_batches = getattr(decode_fn, "__name__", "decode"), ((b, *here(*w)) for b, w in enumerate(work))
    else:
        local = model is not None and decode_fn is not None
        name = f"{pool.processes + local} processes"
        decoded_batches = pool.decode(work, max_new_tokens, here=here if local else None)
    t0 = time.perf_counter()
    with tqdm(total=len(order), desc=f"decode ({name})", disable=not progress) as bar:
        for b, out, stats in decoded_batches:
            idx = batches[b]
            if len(out) != len(idx):
                raise RuntimeError(f"decode_fn returned {len(out)} texts for {len(idx)} prompts.")
            for i, text in zip(idx, out):
                texts[i] = text
            totals.update({k: v for k, v in stats.items() if isinstance(v, int | float)})
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    if was_training and hasattr(model, "train"):
        model.train()

    result = score_outputs(texts, [r["candidates"] for r in rows], [r["target"] for r in rows])
    m = result["metrics"]
    m["decode_seconds"] = round(seconds, 2)
    decoded = len(order)
    if given:
        m["decoded_rows"] = decoded
    if "generated_tokens" in totals:
        m["generated_tokens"] = int(totals["generated_tokens"])
        m["mean_completion_tokens"] = totals["generated_tokens"] / decoded if decoded else 0.0
        m["tokens_per_s"] = totals["generated_tokens"] / seconds if seconds > 0 else 0.0
    if totals.get("forward_passes"):
        m["forward_passes"] = int(totals["forward_passes"])
        m["tokens_per_forward"] = totals.get("generated_tokens", 0) / totals["forward_passes"]
    m["examples_per_s"] = decoded / seconds if seconds > 0 else 0.0
    out = {"n": len(rows), "metrics": m, "prerank": result["prerank"]}
    if keep_outputs:
        out["outputs"] = texts
        out["ranks"] = result["ranks"]
    return out
