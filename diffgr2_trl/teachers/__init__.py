"""AR-teacher scoring backends: one interface, three backends (in-process HF, vLLM server, in-process vLLM).

>>> teacher = load_teacher("http://127.0.0.1:8000")          # a running `diffgr2 serve-teacher`
>>> scores = teacher.score(sequences, completion_starts, top_k=20)
>>> scores.token_logprobs[0], scores.topk_ids[0], scores.topk_logprobs[0]

See :class:`Teacher` for the position convention (AR token shift).
"""

from __future__ import annotations

import os

from .base import (
    Teacher,
    TeacherError,
    TeacherInputError,
    TeacherResponseError,
    TeacherScores,
    TeacherUnavailableError,
    VocabMismatchError,
    check_vocab_compatible,
)
from .hf import HFTeacher
from .server import VLLMServerError, find_free_port, start_vllm_server, stop_vllm_server, wait_for_health
from .vllm_server import VLLMServerTeacher, parse_prompt_logprobs

__all__ = [
    "HFTeacher",
    "Teacher",
    "TeacherError",
    "TeacherInputError",
    "TeacherResponseError",
    "TeacherScores",
    "TeacherUnavailableError",
    "VLLMServerError",
    "VLLMServerTeacher",
    "VLLMTeacher",
    "VocabMismatchError",
    "check_vocab_compatible",
    "find_free_port",
    "load_teacher",
    "parse_prompt_logprobs",
    "start_vllm_server",
    "stop_vllm_server",
    "wait_for_health",
]


def __getattr__(name: str):
    # VLLMTeacher imports vllm lazily (inside its constructor), but keep even the module import off the default path.
    if name == "VLLMTeacher":
        from .vllm_local import VLLMTeacher

        return VLLMTeacher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_teacher(spec: str | os.PathLike, **kwargs) -> Teacher:
    """Build a teacher from a string.

    - ``"http://host:port"`` / ``"https://..."``: :class:`VLLMServerTeacher` on a running vLLM server;
    - ``"vllm:PATH"``: in-process :class:`VLLMTeacher` (mind the ``if __name__ == "__main__":`` guard);
    - anything else (a checkpoint path or hub id): in-process :class:`HFTeacher`.

    ``kwargs`` go to the backend's constructor.
    """
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return VLLMServerTeacher(spec, **kwargs)
    if spec.startswith("vllm:"):
        from .vllm_local import VLLMTeacher

        return VLLMTeacher(spec[len("vllm:") :], **kwargs)
    return HFTeacher(spec, **kwargs)
