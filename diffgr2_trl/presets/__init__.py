"""Preset YAML files: ``ar_NAME.yaml`` (defaults of ``diffgr2 train-ar --preset NAME``) and ``pipeline_NAME.yaml``
(the stage sections of ``diffgr2 pipeline --preset NAME``). :func:`load_preset_file` is the one loader of both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent


def preset_names(kind: str) -> list[str]:
    """Names of the presets of one kind (``"ar"`` or ``"pipeline"``)."""
    return sorted(p.stem.removeprefix(f"{kind}_") for p in PRESETS_DIR.glob(f"{kind}_*.yaml"))


def load_preset_file(kind: str, name: str) -> dict[str, Any]:
    """The mapping in ``presets/{kind}_{name}.yaml``; :class:`~diffgr2_trl.errors.UserError` naming the choices when
    there is no such preset."""
    import yaml

    from ..errors import UserError

    path = PRESETS_DIR / f"{kind}_{name}.yaml"
    if not path.is_file():
        raise UserError(f"Unknown {kind} preset {name!r}; choose from {preset_names(kind)}.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping.")
    return values
