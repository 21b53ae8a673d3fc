"""Small shared utilities: the one atomic file write (bytes; text and JSON on top of it) and the one ``--threads`` helper."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8, :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write_text`); values JSON cannot hold are
    written with ``str``."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def accelerator_type() -> str | None:
    """The accelerator torch can train on here (``"cuda"``, ``"xpu"`` or ``"mps"``, the order in which transformers
    picks a device), or None on a CPU-only machine. "No CUDA" is not "CPU only": an Apple or Intel GPU would
    otherwise be skipped without a word."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def set_threads(threads: int | None) -> None:
    """What ``--threads`` means in every ``diffgr2`` subcommand: torch's intra-op CPU threads
    (``torch.set_num_threads``), set once before any model work; ``0`` or ``None`` keeps torch's default.

    ``OMP_NUM_THREADS`` is set to the same number when unset, so worker processes started later agree.
    On a contended 2-core machine 1-2 threads is often fastest: measure.
    """
    if not threads or threads <= 0:
        return
    import torch

    torch.set_num_threads(int(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(int(threads)))
