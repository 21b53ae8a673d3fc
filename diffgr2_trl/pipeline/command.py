"""``diffgr2 pipeline``: the whole Diffusion-GR2 recipe on the Amazon data it finds (``--data_dir``, or the shared
data by default), resumable, with a report naming the dataset.

    diffgr2 pipeline --preset cpu --output_dir runs/cpu          # the main job (~50 min on a 2-core CPU)
    diffgr2 pipeline --preset smoke --output_dir runs/smoke      # minutes; what CI runs
    diffgr2 pipeline --preset gpu --output_dir runs/gpu --teacher_url http://127.0.0.1:8000   # see README

Re-running with the same ``--output_dir`` (``--out``: deprecated spelling) skips finished stages; an interrupted
training stage resumes from its last checkpoint. ``--overrides file.yaml`` changes any stage's options (same layout
as ``diffgr2_trl/presets/``).

This subcommand lives with the pipeline rather than in ``diffgr2_trl.commands``: the pipeline calls the other
subcommands' ``run``, so keeping its own command here keeps ``commands`` free of any import of ``pipeline``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..commands._args import parse_command
from .runner import PipelineArguments, run_pipeline


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[PipelineArguments]:
    return parse_command("pipeline", (PipelineArguments,), argv, values)


def run(args: PipelineArguments) -> dict:
    """Run (or resume) the pipeline; returns ``{stage: record}``."""
    records = run_pipeline(args)
    report = (records.get("report") or {}).get("metrics", {}).get("report")
    if report:
        print(f"report: {report}")
    return records


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0
