"""The pipeline's stage table and stage records, shared by the runner (which writes them) and the report (which
reads them); neither imports the other through this module.

Every stage works in ``RUN/<stage>/`` and is *done* once ``RUN/<stage>/stage.json`` exists (written atomically after
its outputs): ``{"stage", "status", "wall_s", "fingerprint", "inputs", "metrics"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The stages, in the order they run.
STAGE_NAMES: tuple[str, ...] = (
    "prepare", "baseline", "ar_mid", "ar_sft", "ar_rl", "eval_ar", "convert", "eval_naive", "cft", "eval_cft", "opd",
    "eval_opd", "rl", "eval_rl", "decode", "report",
)

# stage -> (preset sections it reads, upstream stages whose outputs it reads)
STAGE_DEPENDENCIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("prepare",), ()),
    "baseline": (("evaluate",), ("prepare",)),
    "ar_mid": (("ar_mid",), ("prepare",)),
    "ar_sft": (("ar_sft",), ("prepare", "ar_mid")),
    "ar_rl": (("ar_rl",), ("prepare", "ar_sft")),
    "eval_ar": (("evaluate",), ("prepare", "ar_rl")),
    "convert": (("convert",), ("ar_rl",)),
    "eval_naive": (("evaluate",), ("prepare", "convert")),
    "cft": (("cft",), ("prepare", "convert")),
    "eval_cft": (("evaluate",), ("prepare", "cft")),
    "opd": (("opd",), ("prepare", "cft", "ar_rl")),
    "eval_opd": (("evaluate",), ("prepare", "opd")),
    "rl": (("rl",), ("prepare", "opd")),
    "eval_rl": (("evaluate",), ("prepare", "rl")),
    "decode": (("decode",), ("prepare", "ar_rl", "rl")),
}


def stage_record(run: str | Path, name: str) -> dict[str, Any] | None:
    """The record ``RUN/<name>/stage.json`` of a finished stage, or ``None`` when the stage is not done."""
    marker = Path(run) / name / "stage.json"
    return json.loads(marker.read_text()) if marker.exists() else None
