"""Copy learning: how fast a model shape learns to copy candidate IDs from its prompt, under a given recipe.

Why this exists: a small re-ranker trained from scratch writes frequent IDs instead of the row's candidates until it
has seen tens of thousands of diverse lists (a phase change; :mod:`diffgr2_trl.rerank.midtrain`). Until it copies,
every row of the pipeline's report sits on the pre-rank floor. This loop measures the levers that move the phase
change (prompt format, task mix, shape, optimiser, step cost) as curves on one fixed held-out set, so recipes can be
compared at equal lists and equal minutes.

``diffgr2 bench-copy`` draws the curves; ``train-ar``'s mid stage (``mid_source="fresh"``) trains with the same loop.
The loop is plain PyTorch on purpose: AdamW, warm-up, constant or cosine decay, gradient clipping, completion-only
cross-entropy with the output layer applied to completion positions only (the prompt's logits are never needed), and
fresh seeded lists every step from :func:`~diffgr2_trl.rerank.midtrain.build_midtraining_rows`, so no list repeats.

Held-out metrics (``front`` task: move a named candidate to the front, keep the rest in order):

- ``exact``: share of lists whose every answer token (from the recommendations opener to EOS) is the argmax under
  teacher forcing;
- ``valid``: share of greedy decodes that parse as a permutation of the candidates;
- ``correct``: share of greedy decodes whose ranking is the expected one.

The same three on held-out *re-ranking* rows (the prepared valid split: full prompt, the model's own explanation in
the greedy decode) are ``rerank_exact`` / ``rerank_valid`` / ``rerank_correct``: bare lists stop tracking what the
teacher must do once re-ranking rows join the mix (their skill can fall while re-ranking validity rises), so a lever
is judged on these.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..block_diffusion.attention import cpu_gqa_attention
from ..block_diffusion.likelihood import output_logits
from ..errors import OptionError
from .midtrain import ItemPool, build_midtraining_rows, parse_task_mix
from .parsing import parse_ranking
from .prompts import RECOMMENDATIONS_OPEN, SID_RE
from .semantic_ids import SemanticIds
from .tokenizer import encode_prompt_completion

__all__ = ["CopyRecipe", "HeldOut", "evaluate_copying", "first_reaching", "greedy_answers", "heldout_from_rows", "lr_at",
           "make_heldout", "make_rerank_heldout", "mix_at", "rerank_rows_for", "teacher_forced_exact", "train_copying"]

# Held-out lists are drawn with this seed offset, far from any training step's seed (seed + step).
_HELDOUT_SEED = 10**7
# Tasks whose rows are full re-ranking prompts (~4x a list): batched apart so short lists are not padded to them.
_LONG = ("rerank", "promote")


@dataclass(frozen=True)
class CopyRecipe:
    """What a copy-learning run varies (the model shape is chosen by the caller).

    Parameters:
        id_line: end list prompts with the candidate IDs as the answer writes them (``IDs: ["<sid>", ...]``).
        mix: task weights (:func:`~diffgr2_trl.rerank.midtrain.parse_task_mix`; ``None``: the default mix).
        mix_end: a curriculum: the task weights at the last step; each step's weights move linearly from ``mix`` to
            these (``None``: ``mix`` throughout). Lists drive the copy phase change at a quarter of a re-ranking
            row's cost, and re-ranking rows carry the copy into the full prompt; this schedules the one before the
            other (``results/copy_learning.md``).
        batch_size: fresh lists per step.
        learning_rate / betas / weight_decay / clip: AdamW and gradient-norm clipping.
        warmup_steps: linear warm-up from 0.
        schedule: ``constant`` or ``cosine`` (decays to ``min_lr_ratio`` x the learning rate at ``max_steps``).
        max_steps: training steps (also the cosine horizon).
    """

    id_line: bool = False
    mix: str | None = None
    mix_end: str | None = None
    batch_size: int = 32
    learning_rate: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip: float = 1.0
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.02
    max_steps: int = 1300

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise OptionError("schedule", f"must be constant or cosine, got {self.schedule!r}.")
        for name in ("batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.")
        parse_task_mix(self.mix)  # a bad mix fails here, not at the first step
        if self.mix_end is not None:
            parse_task_mix(self.mix_end)

    @property
    def tasks(self) -> set[str]:
        """Every task some step of the recipe draws from."""
        return set(parse_task_mix(self.mix)) | (set(parse_task_mix(self.mix_end)) if self.mix_end is not None else set())


def mix_at(step: int, recipe: CopyRecipe) -> dict[str, float]:
    """The task weights of step ``step`` (0-based): ``recipe.mix``, moved linearly towards ``recipe.mix_end``."""
    return _mix_schedule(recipe)(step)


def _mix_schedule(recipe: CopyRecipe):
    """``step -> task weights``, with both mixes parsed once (the training loop asks every step)."""
    start = parse_task_mix(recipe.mix)
    if recipe.mix_end is None:
        return lambda step: start
    end = parse_task_mix(recipe.mix_end)
    tasks = sorted(set(start) | set(end))

    def at(step: int) -> dict[str, float]:
        f = min(1.0, step / max(1, recipe.max_steps - 1))
        mixed = {t: (1 - f) * start.get(t, 0.0) + f * end.get(t, 0.0) for t in tasks}
        return {t: w for t, w in mixed.items() if w > 0}

    return at


def lr_at(step: int, recipe: CopyRecipe) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    if recipe.schedule == "constant":
        return recipe.learning_rate
    span = max(1, recipe.max_steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.min_lr_ratio
    return recipe.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class HeldOut:
    """Fixed ``front`` lists: token ids, where the answer starts, and what a decode must produce."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]
    answer_starts: list[int]  # index of the recommendations opener token in input_ids
    candidates: list[list[str]]
    expected: list[list[str]]
    prompts: list[str]


def _answer_of(completion: str) -> list[str]:
    return SID_RE.findall(completion.split(RECOMMENDATIONS_OPEN, 1)[1])


def heldout_from_rows(rows: Sequence[Mapping[str, Any]], tokenizer) -> HeldOut:
    """A :class:`HeldOut` from ``{"prompt", "completion"}`` rows whose completion ends in the answer template.

    The candidates are the IDs of the completion's answer (a valid permutation of the row's candidates).
    """
    ids, masks = encode_prompt_completion([r["prompt"] for r in rows], [r["completion"] for r in rows], tokenizer)
    opener = tokenizer.convert_tokens_to_ids(RECOMMENDATIONS_OPEN)
    prompt_lengths = [m.index(1) for m in masks]
    starts = []
    for row_ids, p in zip(ids, prompt_lengths):
        if opener not in row_ids[p:]:
            raise ValueError(f"the tokenizer does not keep {RECOMMENDATIONS_OPEN!r} as one token; copy learning "
                             "needs the prepared tokenizer (diffgr2 prepare).")
        starts.append(p + row_ids[p:].index(opener))
    expected = [_answer_of(r["completion"]) for r in rows]
    return HeldOut(ids, prompt_lengths, starts, [sorted(e) for e in expected], expected, [r["prompt"] for r in rows])


def make_heldout(train_sequences: Mapping[int, Sequence[int]], sids: SemanticIds, tokenizer, n: int = 64,
                 seed: int = 0, id_line: bool = False, n_candidates: int = 10) -> HeldOut:
    """``n`` seeded ``front`` lists, the same items and order for every recipe (the ID line only adds a line)."""
    rows = build_midtraining_rows(train_sequences, sids, n, n_candidates=n_candidates, mix="front=1",
                                  seed=seed + _HELDOUT_SEED, with_id_line=id_line)
    return heldout_from_rows(rows, tokenizer)


def make_rerank_heldout(prepared_dir, tokenizer, n: int = 64, split: str = "valid") -> HeldOut:
    """The first ``n`` rows of a prepared split (the valid split by default: never trained on, never the test rows)."""
    from .pipeline_data import load_split

    ds = load_split(prepared_dir, split)
    if len(ds) == 0:
        raise ValueError(f"the prepared {split!r} split of {prepared_dir} is empty; nothing to hold out.")
    return heldout_from_rows(ds.select(range(min(n, len(ds)))).select_columns(["prompt", "completion"]).to_list(),
                             tokenizer)


def rerank_rows_for(recipe: CopyRecipe, prepared_dir) -> list[dict[str, str]] | None:
    """The prepared train split's ``{"prompt", "completion"}`` rows when some step of ``recipe`` draws a ``rerank`` or
    ``promote`` task, else None."""
    from .pipeline_data import load_split

    if not {"rerank", "promote"} & recipe.tasks:
        return None
    return load_split(prepared_dir, "train").select_columns(["prompt", "completion"]).to_list()


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _right_padded(attention: torch.Tensor) -> bool:
    """Is every row's mask ones then zeros (pads only at the end)?"""
    return bool((attention.cummin(dim=-1).values == attention).all())


def _completion_loss(model, ids: torch.Tensor, attention: torch.Tensor, targets: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (mean, or ``sum``) over positions whose next token is a completion token (``targets`` != -100).

    The decoder runs once; the output layer (and the model's logit post-processing) is applied to those positions
    only. A right-padded batch runs without its padding mask: under causal attention no real token sees a later pad,
    so the loss is the same, and the attention kernel then takes its causal fast path with no mask to build (~7% faster mid steps in a cpu
    preset run; ``scripts/measure_padding_mask.py`` measures it side by side).
    """
    mask = None if _right_padded(attention) else attention
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = targets != -100
    # output_logits, not the bare output layer: the forward's logit post-processing (Gemma 2's final soft-capping,
    # Cohere/Granite scaling) must shape the training loss as it shapes decoding.
    logits = output_logits(model, hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def _batch(rows: list[dict], tokenizer, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    ids, masks = encode_prompt_completion([r["prompt"] for r in rows], [r["completion"] for r in rows], tokenizer)
    input_ids = _pad(ids, pad_id)
    attention = _pad([[1] * len(s) for s in ids], 0)
    comp = _pad(masks, 0).bool()
    targets = input_ids[:, 1:].masked_fill(~comp[:, 1:], -100)  # position i predicts token i + 1
    targets = F.pad(targets, (0, 1), value=-100)
    return input_ids, attention, targets, sum(len(s) for s in ids)


def _rows(heldout: HeldOut, batch_size: int):
    n = len(heldout.input_ids)
    return [range(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]


@torch.no_grad()
def teacher_forced_exact(model, heldout: HeldOut, pad_token_id: int, batch_size: int = 64) -> list[bool]:
    """Per list: is every answer token (recommendations opener ... EOS) the argmax given the true prefix?"""
    out = []
    for rows in _rows(heldout, batch_size):
        device = _device(model)
        ids = _pad([heldout.input_ids[r] for r in rows], pad_token_id).to(device)
        attention = _pad([[1] * len(heldout.input_ids[r]) for r in rows], 0).to(device)
        pred = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.argmax(-1)
        for i, r in enumerate(rows):
            row = heldout.input_ids[r]
            out.append(all(int(pred[i, p - 1]) == row[p] for p in range(heldout.answer_starts[r], len(row))))
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, heldout: HeldOut, batch_size: int = 64) -> list[list[str] | None]:
    """Per list: the greedy decode's ranking when it is a valid permutation of the candidates, else ``None``."""
    pad = tokenizer.pad_token_id
    out: list[list[str] | None] = []
    for rows in _rows(heldout, batch_size):
        prompts = [heldout.input_ids[r][: heldout.prompt_lengths[r]] for r in rows]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded for generate
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        budget = max(len(heldout.input_ids[r]) - heldout.prompt_lengths[r] for r in rows) + 8
        device = _device(model)
        with cpu_gqa_attention(model):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for text, r in zip(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True), rows):
            out.append(parse_ranking(text, heldout.candidates[r]).ranking)  # None unless a valid permutation
    return out


def evaluate_copying(model, tokenizer, heldout: HeldOut, batch_size: int = 64) -> dict[str, float]:
    """Held-out ``exact`` (teacher forcing), ``valid`` and ``correct`` (greedy decoding) shares."""
    was_training = model.training
    model.eval()
    try:
        exact = teacher_forced_exact(model, heldout, tokenizer.pad_token_id, batch_size)
        answers = greedy_answers(model, tokenizer, heldout, batch_size)
    finally:
        model.train(was_training)
    n = len(exact)
    return {"exact": sum(exact) / n, "valid": sum(a is not None for a in answers) / n,
            "correct": sum(a == e for a, e in zip(answers, heldout.expected)) / n}


def train_copying(
    model,
    tokenizer,
    train_sequences: Mapping[int, Sequence[int]],
    sids: SemanticIds,
    recipe: CopyRecipe,
    heldout: HeldOut | None,
    *,
    eval_steps: int = 100,
    seed: int = 0,
    n_candidates: int = 10,
    max_minutes: float | None = None,
    stop_at_exact: float | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    evaluate_first: bool = True,
    log_steps: int = 0,
    rerank_rows: Sequence[Mapping[str, Any]] | None = None,
    rerank_heldout: HeldOut | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on fresh lists with ``recipe``; return the curve (a point at step 0 and every ``eval_steps``).

    Each point: ``step``, ``lists`` (seen so far), ``train_minutes`` (training time only, evaluations excluded),
    ``loss`` (mean over the steps since the last point), ``lr``, ``s_per_step``, ``lists_per_s``, ``tokens_per_s``
    (non-pad tokens), and the held-out ``exact`` / ``valid`` / ``correct``. ``on_point`` is called with each point as
    it is made (write it out there: a long run keeps its curve if interrupted).

    Stops at ``recipe.max_steps``, after ``max_minutes`` of training time, or once held-out exact reaches
    ``stop_at_exact``. ``evaluate_first=False`` skips the step-0 point (a training run that only needs the last one);
    ``heldout=None`` makes points without held-out metrics; ``log_steps > 0`` prints the training loss that often.
    ``rerank_rows`` feed a ``rerank`` or ``promote`` task in the recipe's mix; such rows (~4x longer than a list) are
    padded and run apart from the short rows in the same step, the loss being the mean over all completion tokens of
    the step. ``rerank_heldout`` (:func:`make_rerank_heldout`) adds ``rerank_exact`` / ``rerank_valid`` /
    ``rerank_correct`` to every point.
    The model may sit on any device; batches follow it.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    random.seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.learning_rate, betas=recipe.betas)
    pad = tokenizer.pad_token_id
    points: list[dict[str, Any]] = []
    train_s = 0.0
    window = {"loss": 0.0, "steps": 0, "seconds": 0.0, "tokens": 0}

    def point(step: int) -> dict[str, Any]:
        steps = max(1, window["steps"])
        p = {"step": step, "lists": step * recipe.batch_size, "train_minutes": round(train_s / 60, 3),
             "loss": window["loss"] / steps if window["steps"] else None, "lr": lr_at(max(0, step - 1), recipe),
             "s_per_step": window["seconds"] / steps if window["steps"] else None,
             "lists_per_s": recipe.batch_size * window["steps"] / window["seconds"] if window["seconds"] else None,
             "tokens_per_s": window["tokens"] / window["seconds"] if window["seconds"] else None,
             **(evaluate_copying(model, tokenizer, heldout) if heldout is not None else {}),
             **({f"rerank_{k}": v for k, v in evaluate_copying(model, tokenizer, rerank_heldout, 32).items()}
                if rerank_heldout is not None else {})}
        window.update(loss=0.0, steps=0, seconds=0.0, tokens=0)
        points.append(p)
        if on_point is not None:
            on_point(p)
        return p

    if evaluate_first:
        point(0)
    device = _device(model)
    model.train()
    bar = tqdm(range(recipe.max_steps), desc="copy", disable=not progress, mininterval=5)
    mix_of = _mix_schedule(recipe)
    pool = ItemPool.build(train_sequences, sids)
    for step in bar:
        rows = build_midtraining_rows(train_sequences, sids, recipe.batch_size, n_candidates=n_candidates,
                                      mix=mix_of(step), seed=seed + step, with_id_line=recipe.id_line,
                                      rerank_rows=rerank_rows, pool=pool)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        groups = [g for g in ([r for r in rows if r["task"] not in _LONG], [r for r in rows if r["task"] in _LONG])
                  if g]
        batches = [tuple(t.to(device) if torch.is_tensor(t) else t for t in _batch(g, tokenizer, pad)) for g in groups]
        n_tokens = sum(b[3] for b in batches)
        n_targets = sum(int((b[2] != -100).sum()) for b in batches)
        loss = torch.zeros((), device=device)
        for ids, attention, targets, _ in batches:  # one backward per length class: short lists are not padded long
            part = _completion_loss(model, ids, attention, targets, reduction="sum") / n_targets
            part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        train_s += seconds
        window["loss"] += float(loss.detach())
        window["steps"] += 1
        window["seconds"] += seconds
        window["tokens"] += n_tokens
        if log_steps > 0 and (step + 1) % log_steps == 0:
            print(f"copy step {step + 1}/{recipe.max_steps}: loss {float(loss.detach()):.4f}, lr {lr_at(step, recipe):.2e}, "
                  f"{train_s / (step + 1):.3f} s/step", flush=True)
        done = step + 1 == recipe.max_steps or (max_minutes is not None and train_s >= 60 * max_minutes)
        if (step + 1) % eval_steps == 0 or done:
            p = point(step + 1)
            bar.set_postfix(exact=p.get("exact"), valid=p.get("valid"), loss=round(p["loss"], 3))
            if stop_at_exact is not None and p.get("exact", 0.0) >= stop_at_exact:
                break
        if done:
            break
    bar.close()
    return points


def first_reaching(points: Sequence[Mapping[str, Any]], key: str, level: float) -> dict[str, Any] | None:
    """The first point whose ``key`` is >= ``level`` (lists and minutes to a target), or ``None``."""
    return next((dict(p) for p in points if p.get(key) is not None and p[key] >= level), None)
