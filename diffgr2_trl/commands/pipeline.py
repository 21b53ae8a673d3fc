"""``diffgr2 pipeline``: the whole Diffusion-GR2 recipe on Amazon Beauty, resumable, with a report.

    diffgr2 pipeline --preset cpu --out runs/cpu                 # the main job (~40 min on a 2-core CPU)
    diffgr2 pipeline --preset smoke --out runs/smoke             # minutes; what CI runs
    diffgr2 pipeline --preset gpu --out runs/gpu --teacher_url http://127.0.0.1:8000   # see README

Re-running with the same ``--out`` skips finished stages; an interrupted training stage resumes from its last
checkpoint. ``--overrides file.yaml`` changes any stage's options (same layout as ``diffgr2_trl/presets/``).
"""

from __future__ import annotations

from trl import TrlParser

from ..pipeline import PipelineArguments, run_pipeline


def main(argv: list[str]) -> int:
    (args,) = TrlParser((PipelineArguments,)).parse_args_and_config(argv)
    records = run_pipeline(args)
    report = (records.get("report") or {}).get("metrics", {}).get("report")
    if report:
        print(f"report: {report}")
    return 0
