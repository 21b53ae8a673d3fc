"""The teacher interface: score token sequences, return per-position log-probs of an autoregressive teacher.

Convention (the AR token shift the trainers use): completion position ``j`` of sequence ``i`` is the token
``sequences[i][completion_starts[i] + j]``, scored from the prefix ``sequences[i][: completion_starts[i] + j]``.
Every backend returns exactly one row per completion position, or raises: a missing position is never filled
with a zero or a ``-inf``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Teacher",
    "TeacherError",
    "TeacherInputError",
    "TeacherResponseError",
    "TeacherScores",
    "TeacherUnavailableError",
    "VocabMismatchError",
    "check_vocab_compatible",
]


class TeacherError(RuntimeError):
    """Base class of every error a teacher backend raises on purpose."""


class TeacherUnavailableError(TeacherError):
    """The teacher server could not be reached (or kept failing) after all retries."""

    def __init__(self, url: str, attempts: int, last_error: BaseException | str | None = None):
        self.url, self.attempts, self.last_error = url, attempts, last_error
        super().__init__(
            f"Teacher server at {url} is unavailable after {attempts} attempt(s); last error: {last_error!r}. "
            "Start it with `diffgr2 serve-teacher --model_name_or_path PATH` (or `python -m vllm.entrypoints.openai.api_server`) "
            "and check that the URL and port are right."
        )


class TeacherResponseError(TeacherError):
    """The teacher answered, but the answer is unusable (an HTTP error, or fewer positions than asked)."""


class TeacherInputError(TeacherError, ValueError):
    """The sequences given to ``score`` cannot be scored by this teacher (bad ids, mask token, too long)."""


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers disagree where they must agree."""


@dataclass
class TeacherScores:
    """Per completion position log-probs of a teacher; one entry per input sequence.

    Attributes:
        token_logprobs: ``[Lc_i]`` float32, log-prob of the actual token at each completion position.
        topk_ids: ``[Lc_i, k]`` int64, the teacher's top-k token ids per position, most probable first.
        topk_logprobs: ``[Lc_i, k]`` float32, their log-probs.
        full_logprobs: ``[Lc_i, V]`` float32 full-vocabulary log-probs, when a backend returns them dense
            (``full_vocab=True`` only), else ``None``.
        full_hidden / full_head: the lazy form of the full-vocabulary log-probs (``full_vocab=True``,
            :class:`~diffgr2_trl.teachers.HFTeacher`): ``[Lc_i, H]`` final hidden states and the function mapping
            ``[..., H]`` states to ``[..., V]`` float32 log-probs. A consumer computes the log-probs of a chunk of
            positions at a time (:meth:`full_logprobs_of` builds one sequence's), so ``(rows, T, V)`` never exists.
    """

    token_logprobs: list[torch.Tensor]
    topk_ids: list[torch.Tensor]
    topk_logprobs: list[torch.Tensor]
    full_logprobs: list[torch.Tensor] | None = None
    full_hidden: list[torch.Tensor] | None = None
    full_head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def has_full_vocab(self) -> bool:
        """Whether full-vocabulary log-probs came back, dense or lazy."""
        return self.full_logprobs is not None or self.full_hidden is not None

    def full_logprobs_of(self, i: int) -> torch.Tensor:
        """``[Lc_i, V]`` float32 full-vocabulary log-probs of sequence ``i``, dense or built from the lazy form."""
        if self.full_logprobs is not None:
            return self.full_logprobs[i]
        if self.full_hidden is None or self.full_head is None:
            raise TeacherResponseError("These scores hold no full-vocabulary log-probs (score with full_vocab=True).")
        return self.full_head(self.full_hidden[i])

    def __len__(self) -> int:
        return len(self.token_logprobs)

    def to(self, device: torch.device | str) -> TeacherScores:
        """A copy with every tensor on ``device``."""

        def move(xs):
            return None if xs is None else [x.to(device) for x in xs]

        return TeacherScores(move(self.token_logprobs), move(self.topk_ids), move(self.topk_logprobs),
                             move(self.full_logprobs), move(self.full_hidden), self.full_head)

    def to_dense(self, lengths: Sequence[int] | torch.Tensor, width: int, device, full_vocab: bool) -> dict[str, torch.Tensor]:
        """Right-pad every sequence's scores to ``(rows, width, ...)`` tensors, after checking that every expected
        completion position came back (``lengths[r]`` positions for sequence ``r``).

        Returns ``teacher_token_logprobs`` and, with ``full_vocab``, ``teacher_full_hidden`` (the lazy form: pass
        chunks of it through :attr:`full_head`; padding positions hold zeros) or ``teacher_full_logprobs`` (a backend
        that returned dense log-probs), else ``teacher_topk_ids`` / ``teacher_topk_logprobs`` (padding positions
        hold a uniform top-k distribution, so every row stays a valid distribution).
        """
        rows = len(lengths)
        if len(self) != rows:
            raise TeacherResponseError(f"The teacher returned scores for {len(self)} sequences, expected {rows}.")
        lengths = [int(n) for n in lengths]
        for r, want in enumerate(lengths):
            got = self.token_logprobs[r].shape[0]
            if got != want:
                raise TeacherResponseError(
                    f"The teacher returned {got} completion positions for sequence {r}, expected {want}: every "
                    "committed token needs a teacher distribution (did the backend truncate the sequence?)."
                )
        token_lp = torch.zeros(rows, width, device=device)
        for r, n in enumerate(lengths):
            token_lp[r, :n] = self.token_logprobs[r].to(device)
        dense = {"teacher_token_logprobs": token_lp}
        if full_vocab and self.full_hidden is not None:
            h = self.full_hidden[0]
            full = torch.zeros(rows, width, h.shape[-1], dtype=h.dtype, device=device)
            for r, n in enumerate(lengths):
                full[r, :n] = self.full_hidden[r].to(device)
            dense["teacher_full_hidden"] = full
        elif full_vocab:
            if self.full_logprobs is None:
                raise TeacherResponseError("full_vocab: the teacher returned no full-vocabulary log-probs.")
            full = torch.zeros(rows, width, self.full_logprobs[0].shape[-1], device=device)
            for r, n in enumerate(lengths):
                full[r, :n] = self.full_logprobs[r].to(device)
            dense["teacher_full_logprobs"] = full
        else:
            kk = self.topk_ids[0].shape[-1]
            ids = torch.zeros(rows, width, kk, dtype=torch.long, device=device)
            lps = torch.full((rows, width, kk), -math.log(kk), device=device)
            for r, n in enumerate(lengths):
                ids[r, :n] = self.topk_ids[r].to(device)
                lps[r, :n] = self.topk_logprobs[r].to(device)
            dense["teacher_topk_ids"], dense["teacher_topk_logprobs"] = ids, lps
        return dense


class Teacher(abc.ABC):
    """A frozen autoregressive teacher that scores token sequences.

    Subclasses implement :meth:`_score` and set ``vocab_size`` / ``max_length``; :meth:`score` validates the input
    first (ids in range, no forbidden id such as the student's mask token, length within the context) so a backend
    never sees ids it would silently mis-score.

    Args:
        forbidden_token_ids: ids that must never reach the teacher, typically the student's mask token and any rows
            the conversion appended (see :func:`check_vocab_compatible`, which returns them).
    """

    #: number of rows of the teacher's output distribution.
    vocab_size: int
    #: longest sequence (prompt + completion, in tokens) the backend accepts; ``None`` when unbounded/unknown.
    max_length: int | None = None
    #: largest ``top_k`` the backend accepts (the server's ``--max-logprobs``); ``None`` when unbounded.
    max_top_k: int | None = None
    #: whether ``full_vocab=True`` is supported.
    supports_full_vocab: bool = False

    def __init__(self, forbidden_token_ids: Sequence[int] | int | None = None):
        if isinstance(forbidden_token_ids, int):
            forbidden_token_ids = [forbidden_token_ids]
        self.forbidden_token_ids: set[int] = set(forbidden_token_ids or ())

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        completion_starts: Sequence[int],
        top_k: int = 20,
        full_vocab: bool = False,
    ) -> TeacherScores:
        """Teacher log-probs for every completion position of every sequence.

        Args:
            sequences: full token id sequences (prompt + completion), unpadded.
            completion_starts: index of the first completion token in each sequence (``>= 1``: the first token of a
                sequence has no prefix to be scored from).
            top_k: how many of the teacher's most probable tokens to return per position (``0`` for none).
            full_vocab: also return the full ``[Lc, V]`` log-probs (in-process backends only).

        Returns:
            :class:`TeacherScores`, in the order of ``sequences``.
        """
        sequences = [list(map(int, s)) for s in sequences]
        starts = [int(s) for s in completion_starts]
        self._validate(sequences, starts, top_k, full_vocab)
        if not sequences:
            return TeacherScores([], [], [], [] if full_vocab else None)
        return self._score(sequences, starts, top_k, full_vocab)

    @abc.abstractmethod
    def _score(self, sequences: list[list[int]], starts: list[int], top_k: int, full_vocab: bool) -> TeacherScores:
        """Backend scoring on validated input."""

    def tokenizer_path(self) -> str | None:
        """A local directory holding the teacher's tokenizer, when the backend knows one (for vocabulary checks);
        ``None`` otherwise (pass the tokenizer explicitly then)."""
        return None

    def close(self) -> None:
        """Release the backend's resources (engine, HTTP connections). Idempotent."""
        self._closed = True

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self, sequences: list[list[int]], starts: list[int], top_k: int, full_vocab: bool) -> None:
        name = type(self).__name__
        if len(sequences) != len(starts):
            raise TeacherInputError(f"{name}.score: got {len(sequences)} sequences but {len(starts)} completion starts.")
        if top_k < 0:
            raise TeacherInputError(f"{name}.score: top_k must be >= 0, got {top_k}.")
        if self.max_top_k is not None and top_k > self.max_top_k:
            raise TeacherInputError(
                f"{name}.score: top_k={top_k} exceeds this teacher's limit of {self.max_top_k} "
                "(for a vLLM server, restart it with a larger --max-logprobs)."
            )
        if top_k > self.vocab_size:
            raise TeacherInputError(f"{name}.score: top_k={top_k} exceeds the vocabulary size {self.vocab_size}.")
        if full_vocab and not self.supports_full_vocab:
            raise TeacherInputError(f"{name} cannot return full-vocabulary log-probs; use HFTeacher for full_vocab=True.")
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if not 1 <= start <= len(seq):
                raise TeacherInputError(
                    f"{name}.score: sequence {i} has length {len(seq)} but completion start {start}; "
                    "the start must satisfy 1 <= start <= len(sequence)."
                )
            if self.max_length is not None and len(seq) > self.max_length:
                raise TeacherInputError(
                    f"{name}.score: sequence {i} has {len(seq)} tokens, longer than the teacher's context of "
                    f"{self.max_length} tokens. Truncate the prompt or serve the teacher with a longer max length."
                )
            if not seq:
                continue
            lo, hi = min(seq), max(seq)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise TeacherInputError(
                    f"{name}.score: sequence {i} contains token id {bad}, outside the teacher's vocabulary "
                    f"[0, {self.vocab_size}). Student-only ids (e.g. a mask token added by conversion) must never "
                    "reach the teacher: score only committed (unmasked) sequences."
                )
            if self.forbidden_token_ids:
                hits = self.forbidden_token_ids.intersection(seq)
                if hits:
                    pos = next(p for p, t in enumerate(seq) if t in hits)
                    raise TeacherInputError(
                        f"{name}.score: sequence {i} contains forbidden token id {seq[pos]} at position {pos} "
                        "(the student's mask token or another student-only id). The teacher must only score fully "
                        "decoded sequences."
                    )


def _vocab(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def check_vocab_compatible(
    teacher_vocab_size: int,
    teacher_tokenizer,
    student_tokenizer,
    mask_token_id: int | None = None,
) -> list[int]:
    """Check that a student (e.g. a converted block-diffusion model) can be distilled from a teacher token by token.

    The student's tokenizer must be the teacher's, plus optional tokens appended at the end (the mask token added by
    conversion, say). Every token the teacher knows must keep its id, and the special tokens both define (eos, pad,
    bos) must have the same ids.

    Args:
        teacher_vocab_size: rows of the teacher's output layer (may exceed ``len(teacher_tokenizer)``: padded rows).
        teacher_tokenizer / student_tokenizer: HF tokenizers.
        mask_token_id: the student's mask token id: a student-only token, or a reserved special token of the shared
            vocabulary (never an ordinary teacher token).

    Returns:
        Sorted ids of the student-only tokens (including ``mask_token_id``): pass them to a teacher as
        ``forbidden_token_ids`` so that ``score`` refuses any sequence that still contains one.

    Raises:
        VocabMismatchError: with every disagreement found, so it can be fixed in one go.
    """
    problems: list[str] = []
    n_teacher = len(teacher_tokenizer)
    if n_teacher > teacher_vocab_size:
        problems.append(
            f"the teacher tokenizer has {n_teacher} tokens but the teacher model only {teacher_vocab_size} output rows"
        )
    n_student = len(student_tokenizer)
    if n_student < n_teacher:
        problems.append(f"the student tokenizer has {n_student} tokens, fewer than the teacher's {n_teacher}")

    t_vocab, s_vocab = _vocab(teacher_tokenizer), _vocab(student_tokenizer)
    moved = [(tok, tid, s_vocab.get(tok)) for tok, tid in t_vocab.items() if s_vocab.get(tok) != tid]
    if moved:
        moved.sort(key=lambda x: x[1])
        shown = ", ".join(f"{tok!r}: teacher {tid} vs student {sid}" for tok, tid, sid in moved[:5])
        problems.append(f"{len(moved)} teacher token(s) are missing or have another id in the student ({shown}, ...)")

    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        t_id, s_id = getattr(teacher_tokenizer, name, None), getattr(student_tokenizer, name, None)
        if t_id is not None and s_id is not None and t_id != s_id:
            problems.append(f"{name} differs: teacher {t_id} vs student {s_id}")

    teacher_ids = set(t_vocab.values())
    student_only = sorted(i for i in s_vocab.values() if i not in teacher_ids)
    if mask_token_id is not None:
        if mask_token_id in teacher_ids:
            # A tokenizer built with a spare mask token (never seen in the teacher's training text) is fine: the id is
            # forbidden below like any student-only id. An ordinary teacher token would make real text read as masked.
            token = teacher_tokenizer.convert_ids_to_tokens(mask_token_id)
            special = set(getattr(teacher_tokenizer, "all_special_tokens", [])) | {
                t.content for t in getattr(teacher_tokenizer, "added_tokens_decoder", {}).values() if t.special
            }
            if token not in special:
                problems.append(
                    f"mask_token_id={mask_token_id} is an ordinary teacher token ({token!r}); the mask token must be a "
                    "student-only id or a reserved special token that teacher text never contains"
                )
        if mask_token_id not in student_only:
            student_only = sorted([*student_only, mask_token_id])

    if problems:
        raise VocabMismatchError(
            "Teacher and student vocabularies are incompatible for token-level distillation:\n  - "
            + "\n  - ".join(problems)
        )
    return student_only
