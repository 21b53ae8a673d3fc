"""The pipeline's stage table and stage records, shared by the runner (which writes them) and the report (which
reads them); neither imports the other through this module.

Every stage works in ``RUN/<stage>/`` and is *done* once ``RUN/<stage>/stage.json`` exists (written atomically after
its outputs): ``{"stage", "status", "wall_s", "fingerprint", "inputs", "metrics"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Section:
    """A preset section: the options of one subcommand, as a stage passes them to its ``parse(values=...)``.

    Attributes:
        command: the ``diffgr2`` subcommand whose options the section holds.
        arguments: that subcommand's argument dataclasses, ``"module:Class"`` (imported only to check a preset).
        pipeline_keys: keys the pipeline reads itself (not options of the subcommand), with their defaults.
    """

    command: str
    arguments: tuple[str, ...]
    pipeline_keys: dict[str, Any] = field(default_factory=dict)


_TRAIN_AR = ("diffgr2_trl.rerank.ar:ARTrainArguments",)
_EVALUATE = ("diffgr2_trl.commands.evaluate:EvaluateArguments", "diffgr2_trl.block_diffusion:BlockDecodingConfig")

# preset section -> what it configures
SECTIONS: dict[str, Section] = {
    "prepare": Section("prepare", ("diffgr2_trl.commands.prepare:PrepareArguments",)),
    "ar_mid": Section("train-ar", _TRAIN_AR),
    "ar_sft": Section("train-ar", _TRAIN_AR),
    "ar_rl": Section("train-ar", _TRAIN_AR),
    "convert": Section("convert", ("diffgr2_trl.commands.convert:ConvertArguments",)),
    "cft": Section("cft", ("diffgr2_trl.commands.cft:CFTScriptArguments", "diffgr2_trl.trainers:BlockDiffusionConfig",
                           "trl:ModelConfig")),
    "opd": Section("opd", ("diffgr2_trl.commands.opd:OPDScriptArguments",
                           "diffgr2_trl.trainers:OnPolicyDistillationConfig", "trl:ModelConfig")),
    "rl": Section("grpo", ("diffgr2_trl.commands.grpo:GRPOScriptArguments", "diffgr2_trl.trainers:DiffusionGRPOConfig",
                           "trl:ModelConfig")),
    "evaluate": Section("evaluate", _EVALUATE, {"taus": None, "naive_limit": None}),
    "decode": Section("evaluate", _EVALUATE, {"taus": [0.9, 0.7, 0.5, 0.3], "compiled_ar": False, "batch_sizes": None}),
}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: its directory ``RUN/<name>/`` and its name in ``--stages``.
        section: the preset section it reads (``None``: none).
        upstream: stages whose outputs it reads (their fingerprints are part of its inputs).
        evaluates: for an evaluation stage, the stage whose model it decodes ...
        decoder: ... with this decoder (``ar`` or ``block``).
        report_row: the row label of its evaluation in the report's table (``None``: not a row).
        constrained_row: for an evaluation stage, whether it also decodes constrained when the evaluate section asks.
        limit_key: for an evaluation stage, the evaluate section's pipeline key that caps its rows (``None``: the
            section's own ``limit``).
    """

    name: str
    section: str | None
    upstream: tuple[str, ...] = ()
    evaluates: str | None = None
    decoder: str | None = None
    report_row: str | None = None
    constrained_row: bool = True
    limit_key: str | None = None


def _eval(name: str, model_stage: str, decoder: str, row: str, **kwargs: Any) -> Stage:
    return Stage(name, "evaluate", ("prepare", model_stage), evaluates=model_stage, decoder=decoder, report_row=row,
                 **kwargs)


# The stages, in the order they run: the one table the runner, the checks, the fingerprints and the report read.
# A new stage is one entry here, plus ``stage_<name>`` in the runner unless it is an evaluation.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepare"),
    Stage("baseline", "evaluate", ("prepare",), report_row="logistic re-ranker (6 features)"),
    Stage("reference", "evaluate", ("prepare",), report_row="evidence ranker (what the traces teach)"),
    Stage("ar_mid", "ar_mid", ("prepare",)),
    Stage("ar_sft", "ar_sft", ("prepare", "ar_mid")),
    # the teacher before GR2's RL: what RL changes (unconstrained, the paper's row, only)
    _eval("eval_sft", "ar_sft", "ar", "AR GR2 before RL (SFT)", constrained_row=False),
    Stage("ar_rl", "ar_rl", ("prepare", "ar_sft")),
    _eval("eval_ar", "ar_rl", "ar", "AR GR2 (teacher)"),
    Stage("convert", "convert", ("ar_rl",)),
    # the naive conversion writes almost nothing valid: a few hundred rows show it (naive_limit), and each of its rows
    # decodes to the length cap, so the whole split cost a fifth of the job's evaluation time
    _eval("eval_naive", "convert", "block", "naive conversion", limit_key="naive_limit"),
    Stage("cft", "cft", ("prepare", "convert")),
    _eval("eval_cft", "cft", "block", "+ CFT"),
    Stage("opd", "opd", ("prepare", "cft", "ar_rl")),
    _eval("eval_opd", "opd", "block", "+ CFT + OPD"),
    Stage("rl", "rl", ("prepare", "opd")),
    _eval("eval_rl", "rl", "block", "+ OPD -> RL"),
    Stage("decode", "decode", ("prepare", "ar_rl", "rl")),
    Stage("report", None),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
# stage -> (preset sections it reads, upstream stages): what its fingerprint covers (the report has none)
STAGE_DEPENDENCIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    s.name: ((s.section,) if s.section else (), s.upstream) for s in STAGES if s.name != "report"
}


def pipeline_key(preset: dict[str, Any], section: str, key: str) -> Any:
    """A key the pipeline reads itself from ``preset[section]``, or its default from :data:`SECTIONS`."""
    values = preset.get(section) or {}
    return values.get(key, SECTIONS[section].pipeline_keys.get(key))


def stage_record(run: str | Path, name: str) -> dict[str, Any] | None:
    """The record ``RUN/<name>/stage.json`` of a finished stage, or ``None`` when the stage is not done."""
    marker = Path(run) / name / "stage.json"
    return json.loads(marker.read_text()) if marker.exists() else None
