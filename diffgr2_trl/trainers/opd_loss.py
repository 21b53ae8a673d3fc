"""Token-level divergences between an AR teacher and a block-diffusion student, for on-policy distillation.

Two supports, both normalised per position:

- full vocabulary (in-process HF teacher): teacher and student over the ids both know (the student's mask token and
  other student-only rows are dropped, both sides renormalised);
- top-k + tail (any teacher, e.g. vLLM's ``prompt_logprobs``): the teacher's ``k`` most probable ids plus one bucket
  holding the rest of the mass; the student is gathered on the same ids, and its own remaining mass is its tail. The
  bucketed KL is a lower bound of the full KL (merging outcomes never increases a divergence).

``beta`` follows TRL's GKD convention: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher),
anything between = generalised JSD with mixture ``beta * teacher + (1 - beta) * student``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

TAIL_FLOOR = -30.0

__all__ = ["divergence", "full_vocab_logprobs", "kl_div", "topk_tail_logprobs"]


def kl_div(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dim from log-probs; entries where ``p == 0`` contribute 0 (no ``0 * inf`` NaN)."""
    p = p_logp.exp()
    # where() keeps -inf - -inf = NaN out of the forward; its gradient on the unselected branch is exactly zero.
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p))
    return terms.sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Per-position divergence ``(...,)`` between two distributions given as log-probs over the same support."""
    if beta == 0.0:
        return kl_div(teacher_logp, student_logp)
    if beta == 1.0:
        return kl_div(student_logp, teacher_logp)
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]), dim=0
    )
    return beta * kl_div(teacher_logp, mixture) + (1.0 - beta) * kl_div(student_logp, mixture)


def full_vocab_logprobs(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    exclude_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs ``(..., V')`` on the ids both vocabularies hold and both may produce.

    Rows past the teacher's vocabulary are student-only (the mask token added by conversion, which the sampler never
    commits) and rows past the student's are teacher padding; ``exclude_ids`` drops more ids, e.g. a reserved mask
    token both tokenizers share (the student's replay gives it -inf, the teacher some tiny mass). The dropped ids are
    removed, not masked, and each side renormalised, so neither distribution puts mass where the other cannot and no
    ``0 * log 0`` term appears.
    """
    v = min(student_logits.shape[-1], teacher_logprobs.shape[-1])
    student_logits, teacher_logprobs = student_logits[..., :v], teacher_logprobs[..., :v]
    drop = [i for i in exclude_ids if 0 <= i < v]
    if drop:
        keep = torch.ones(v, dtype=torch.bool, device=student_logits.device)
        keep[drop] = False
        student_logits, teacher_logprobs = student_logits[..., keep], teacher_logprobs[..., keep]
    student = torch.log_softmax(student_logits.float() / temperature, -1)
    teacher = torch.log_softmax(teacher_logprobs.float() / temperature, -1)
    return student, teacher


def topk_tail_logprobs(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs ``(..., k + 1)``: the teacher's top-k ids, then a tail bucket.

    The student side is exact at any temperature (its softmax is over its full vocabulary, the tail is the
    log-sum-exp of everything outside the top-k ids). The teacher only sent temperature-1 log-probs of ``k`` ids,
    so at ``temperature != 1`` its ``k + 1`` buckets are tempered as a ``(k + 1)``-way distribution: an
    approximation (exact at ``temperature == 1``).
    """
    student_all = torch.log_softmax(student_logits.float() / temperature, -1)
    ids = teacher_topk_ids.long()
    # An id the student can never emit (a shared reserved mask token, -inf after replay) may still sit in the
    # teacher's top-k with negligible mass: floor it like the tails so the divergence stays finite.
    student_top = student_all.gather(-1, ids).clamp_min(TAIL_FLOOR)
    # Both tails are floored at e^-30 (~1e-13): when the top-k cover every id one side's tail is exactly empty and
    # the other's holds rounding noise, which would make the divergence infinite.
    student_tail = torch.logsumexp(student_all.scatter(-1, ids, float("-inf")), -1, keepdim=True).clamp_min(TAIL_FLOOR)
    teacher_top = teacher_topk_logprobs.float()
    # 1 - sum(top-k probs), computed as -expm1(log-sum-exp) to keep precision when the top-k hold nearly all mass.
    top_mass = torch.logsumexp(teacher_top, -1, keepdim=True).clamp(max=0.0)
    teacher_tail = torch.log(-torch.expm1(top_mass)).clamp_min(TAIL_FLOOR)
    teacher = torch.cat([teacher_top, teacher_tail], -1)
    if temperature != 1.0:
        teacher = torch.log_softmax(teacher / temperature, -1)
    return torch.cat([student_top, student_tail], -1), teacher
