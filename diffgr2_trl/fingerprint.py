"""What produced an output, so that nothing is reused after its inputs change.

An output's *inputs* are a JSON-able record: resolved options, the data files' sizes and hashes
(:func:`data_digest`), and, in a pipeline, the fingerprints of the upstream stages it reads (the stage table is in
:mod:`diffgr2_trl.pipeline.stages`). The fingerprint is the SHA-256 of those inputs, so a change anywhere upstream
changes everything below it. ``diffgr2 prepare`` records its inputs in its summary and a pipeline stage in its
``stage.json``; a re-run compares them before doing anything (:func:`describe_changes` says what changed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_digest(path: str | Path, chunk: int = 1 << 20) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` of one file."""
    h = hashlib.sha256()
    p = Path(path)
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return {"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()}


def data_digest(data_dir: str | None) -> dict[str, Any]:
    """Digests of the dataset files ``prepare`` reads (the located directory when ``data_dir`` is ``None``)."""
    from .rerank.data import infer_dataset_name, locate_data_dir

    d = locate_data_dir(data_dir, None)
    name = infer_dataset_name(d)
    files = [d / f"{name}.txt", d / f"{name}_item2attributes.json"]
    return {"dataset": name, "files": [file_digest(f) for f in files if f.is_file()]}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two stage input records (``key: old -> new``)."""
    if old is None:
        return ["it was recorded without a fingerprint (an older version of diffgr2)"]
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.startswith("upstream."):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changes.append(f"{key}: {_short(a.get(key, '<unset>'))} -> {_short(b.get(key, '<unset>'))}")
    ups = sorted({k.split(".")[1] for k in set(a) | set(b) if k.startswith("upstream.") and a.get(k) != b.get(k)})
    if ups:
        changes.append(f"upstream stage(s) {', '.join(ups)} changed")
    return changes or ["its inputs changed"]
