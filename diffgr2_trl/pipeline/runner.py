"""Resumable stages of the recipe: prepare -> logistic baseline -> SID mid-training -> AR SFT -> AR RL -> convert ->
CFT -> OPD -> RL, each evaluated on the same test rows.

Every stage works in ``RUN/<stage>/`` and is *done* only once ``RUN/<stage>/stage.json`` exists; that marker is
written atomically after the stage's outputs, so an interrupted stage is simply run again, and the training stages
then resume from their last checkpoint (``checkpoint-*`` in the stage directory). Re-running the pipeline skips done
stages and never deletes their outputs. Each stage calls the function a ``diffgr2`` subcommand wraps
(``diffgr2_trl.commands.<name>.run``, its options parsed by the same ``parse`` the command line uses), with its
options and paths also written to ``RUN/<stage>/args.yaml``, so ``diffgr2 <command> --config RUN/<stage>/args.yaml``
reproduces every stage by hand. A stage's record carries the fingerprint of its inputs
(:mod:`diffgr2_trl.fingerprint`, the stage table in :mod:`.stages`); a re-run never reuses a stage whose inputs
changed (:func:`check_stage_inputs`). The report (:mod:`.report`) reads the stage records only.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..fingerprint import data_digest, describe_changes, fingerprint
from ..presets import load_preset_file
from ..utils import atomic_write_text
from .report import write_report
from .stages import SECTIONS, STAGE_DEPENDENCIES, STAGES, Stage, pipeline_key, stage_record


@dataclass
class PipelineArguments:
    """Arguments of ``diffgr2 pipeline``.

    Parameters:
        preset: ``smoke`` (tiny slice, minutes), ``cpu`` (the default main job), ``gpu-small`` (a from-scratch model
            on one GPU, every model evaluated on the full test split) or ``gpu`` (a real checkpoint).
        output_dir: run directory; re-running with the same directory resumes (``--out``: deprecated spelling).
        data_dir: dataset directory (default: located automatically, e.g. ``../shared/data/amazon-beauty``).
        teacher_url: score OPD with a running vLLM server (``diffgr2 serve-teacher``) instead of in-process HF.
        stages: run only these stages (default: all, in order).
        overrides: YAML file whose per-stage mappings update the preset's (same layout as the preset files).
        overwrite: a stage whose recorded inputs (options, data files, upstream stages) differ from this run's is an
            error unless this is set; then it and every stage below it are rebuilt.
    """

    preset: str = field(default="cpu", metadata={"help": "smoke, cpu, gpu-small or gpu."})
    output_dir: str = field(default="runs/cpu", metadata={"help": "Run directory (resumable)."})
    data_dir: str | None = field(default=None, metadata={"help": "Dataset directory (None: $DIFFGR2_DATA_DIR or ../shared/data/amazon-beauty)."})
    teacher_url: str | None = field(default=None, metadata={"help": "vLLM server URL for the OPD teacher."})
    stages: list[str] = field(default_factory=list, metadata={"help": "Only these stages (none given: all)."})
    overrides: str | None = field(default=None, metadata={"help": "YAML with per-stage overrides."})
    overwrite: bool = field(
        default=False, metadata={"help": "Rebuild stages whose inputs changed (and everything below them)."}
    )


def load_preset(name: str, overrides: str | None = None) -> dict[str, dict[str, Any]]:
    """A pipeline preset with ``overrides`` merged in, every section and key checked against its subcommand."""
    from .validate import validate_preset

    preset = load_preset_file("pipeline", name)
    validate_preset(preset, f"pipeline preset {name!r}")
    if overrides:
        if not Path(overrides).is_file():
            raise UserError(f"--overrides {overrides}: no such file.")
        try:
            extra = yaml.safe_load(Path(overrides).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--overrides {overrides}: not valid YAML ({e}).") from None
        if not isinstance(extra, dict):
            raise UserError(f"--overrides {overrides}: expected a mapping of stage sections.")
        validate_preset(extra, overrides)
        for stage, values in extra.items():
            preset[stage] = {**(preset.get(stage) or {}), **(values or {})}
    return preset


def _stage_options(stage_dir: Path, values: dict[str, Any], name: str = "args.yaml", **paths: Any) -> dict[str, Any]:
    """The stage's options: the preset's plus its model/data/output paths. They are also written to
    ``RUN/<stage>/args.yaml``, so that ``diffgr2 <command> --config RUN/<stage>/args.yaml`` re-runs the stage alone."""
    values = {**values, **{k: str(v) for k, v in paths.items() if v is not None}}
    atomic_write_text(stage_dir / name, yaml.safe_dump(values, sort_keys=False))
    return values


def _has_checkpoint(stage_dir: Path) -> bool:
    return bool(glob.glob(str(stage_dir / "checkpoint-*")))


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; its message says what was saved and the command that resumes the run."""


# Seconds spent in interrupted attempts of a stage (RUN/<stage>/ATTEMPTS), added to its wall time when it finishes.
ATTEMPTS = "attempts.json"


def _earlier_attempts(d: Path) -> list[float]:
    p = d / ATTEMPTS
    return json.loads(p.read_text()) if p.exists() else []


def resume_command(args: PipelineArguments) -> str:
    """The ``diffgr2 pipeline`` command line that resumes the run ``args`` describes."""
    parts = ["diffgr2", "pipeline", "--preset", args.preset, "--output_dir", str(args.output_dir)]
    for name in ("data_dir", "teacher_url", "overrides"):
        if getattr(args, name):
            parts += [f"--{name}", str(getattr(args, name))]
    if args.stages:
        parts += ["--stages", *args.stages]
    return " ".join(parts)


def _interrupted_message(ctx: Context, name: str, seconds: float, finished: list[str]) -> str:
    d = ctx.run / name
    checkpoints = sorted(glob.glob(str(d / "model" / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    saved = f"{len(finished)} finished stage(s) kept" + (f" (last: {finished[-1]})" if finished else "")
    if checkpoints:
        saved += f"; {name} resumes from {Path(checkpoints[-1]).name}"
    else:
        saved += f"; {name} starts over (no checkpoint saved)"
    return (f"interrupted during stage {name} after {seconds:.0f} s. {saved}. "
            f"Resume with: {resume_command(ctx.args)}")


class Context:
    """Paths and settings shared by the stages of one run."""

    def __init__(self, args: PipelineArguments, preset: dict[str, dict[str, Any]]):
        self.args = args
        self.preset = preset
        self.run = Path(args.output_dir)
        self.prepared = self.run / "prepare" / "data"

    def stage(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.preset.get(name) or {})

    def make_stage_dir(self, name: str) -> Path:
        d = self.run / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def model(self, stage: str) -> str:
        return str(self.run / stage / "model")


# ----------------------------------------------------------------------------------------------------- stages
def stage_prepare(ctx: Context, d: Path) -> dict:
    values = ctx.stage("prepare")
    if ctx.args.data_dir:
        values["data_dir"] = ctx.args.data_dir
    from ..commands import prepare as prepare_command

    prepare_command.run(*prepare_command.parse(values=_stage_options(d, values, output_dir=ctx.prepared)))
    from ..rerank.pipeline_data import load_summary

    return load_summary(ctx.prepared)


def _train_ar(ctx: Context, d: Path, stage: str, start: str | None) -> dict:
    values = ctx.stage(f"ar_{stage}")
    from ..commands import train_ar as train_ar_command

    values = _stage_options(d, values, dataset_name=ctx.prepared, output_dir=d / "work", stage=stage, model_name_or_path=start)
    train_ar_command.run(*train_ar_command.parse(values=values))
    produced = d / "work" / stage
    target = Path(ctx.model(d.name))
    if target.exists():
        shutil.rmtree(target)
    os.replace(produced, target)
    summary = d / "work" / f"train_{stage}.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def _mid_enabled(ctx: Context) -> bool:
    return int(ctx.stage("ar_mid").get("mid_max_steps", 0) or 0) > 0


def stage_ar_mid(ctx: Context, d: Path) -> dict:
    """SID mid-training (``train-ar --stage mid``) on the prepared ``mid`` split; skipped when the preset has none."""
    if not _mid_enabled(ctx):
        return {"skipped": "no mid_max_steps in the preset's ar_mid section"}
    return _train_ar(ctx, d, "mid", None)


def stage_ar_sft(ctx: Context, d: Path) -> dict:
    return _train_ar(ctx, d, "sft", ctx.model("ar_mid") if _mid_enabled(ctx) else None)


def stage_baseline(ctx: Context, d: Path) -> dict:
    """The six-feature logistic re-ranker on the evaluation rows (same split and limit as the evaluation stages)."""
    from ..rerank.baselines import evaluate_logistic

    values = ctx.stage("evaluate")
    result = evaluate_logistic(ctx.prepared, split=values.get("split", "test"), limit=values.get("limit"))
    atomic_write_text(d / "eval.json", json.dumps(result, indent=2))
    return {k: v for k, v in result.items() if k not in ("ranks", "prerank_ranks", "user_ids", "rankings")}


def stage_reference(ctx: Context, d: Path) -> dict:
    """The evidence ranker the training traces follow (``prepare.targets: evidence``), on the evaluation rows: the
    reference row of what the teacher imitates. Skipped when the traces come from another rule."""
    from ..rerank.baselines import evaluate_evidence_ranker
    from ..rerank.pipeline_data import load_summary

    if load_summary(ctx.prepared).get("targets") != "evidence":
        return {"skipped": "the training traces do not follow the evidence ranker (prepare.targets is not evidence)"}
    values = ctx.stage("evaluate")
    result = evaluate_evidence_ranker(ctx.prepared, split=values.get("split", "test"), limit=values.get("limit"))
    atomic_write_text(d / "eval.json", json.dumps(result, indent=2))
    return {k: v for k, v in result.items() if k not in ("ranks", "prerank_ranks", "user_ids", "rankings")}


def stage_ar_rl(ctx: Context, d: Path) -> dict:
    return _train_ar(ctx, d, "rl", ctx.model("ar_sft"))


def stage_convert(ctx: Context, d: Path) -> dict:
    values = ctx.stage("convert")
    from ..commands import convert as convert_command

    spec = convert_command.run(*convert_command.parse(values=_stage_options(d, values, model_name_or_path=ctx.model("ar_rl"),
                                                                     output_dir=d / "model")))
    return {"block_size": spec["block_size"]}


def _train_stage(ctx: Context, d: Path, command, **paths: Any) -> dict:
    """Run a trainer subcommand's ``run`` with ``output_dir = RUN/<stage>/model``, resuming from its last checkpoint."""
    values = _stage_options(d, ctx.stage(d.name), output_dir=d / "model", **paths)
    if _has_checkpoint(d / "model"):
        from transformers.trainer_utils import get_last_checkpoint

        values["resume_from_checkpoint"] = get_last_checkpoint(str(d / "model"))
        step = values["resume_from_checkpoint"].rsplit("-", 1)[1]
        total = values.get("max_steps")
        print(f"{d.name}: resuming from {Path(values['resume_from_checkpoint']).name} (step {step}"
              + (f" of {total})" if total else ")"), flush=True)
    command.run(*command.parse(values=values))
    history = d / "model" / "log_history.json"
    return {"log_history": json.loads(history.read_text())} if history.exists() else {}


def stage_cft(ctx: Context, d: Path) -> dict:
    from ..commands import cft as cft_command

    return _train_stage(ctx, d, cft_command, model_name_or_path=ctx.model("convert"), dataset_name=ctx.prepared)


def stage_opd(ctx: Context, d: Path) -> dict:
    teacher = ctx.args.teacher_url or ctx.model("ar_rl")
    from ..commands import opd as opd_command

    return _train_stage(ctx, d, opd_command, model_name_or_path=ctx.model("cft"), teacher=teacher,
                        dataset_name=ctx.prepared)


def stage_rl(ctx: Context, d: Path) -> dict:
    from ..commands import grpo as grpo_command

    return _train_stage(ctx, d, grpo_command, model_name_or_path=ctx.model("opd"), dataset_name=ctx.prepared)


def _evaluate_options(ctx: Context, d: Path, model: str, decoder: str, tau: float | None = None, tag: str = "eval",
                      section: str = "evaluate", constrained: bool = False, batch_size: int | None = None,
                      threads: int | None = None, limit: int | None = None, **extra: Any) -> tuple[Path, dict]:
    """``(args file, options)`` of one ``diffgr2 evaluate`` run of a stage (``extra``: more evaluate options); the
    file is written."""
    values = ctx.stage(section)
    for key in SECTIONS[section].pipeline_keys:  # read by the pipeline, not options of evaluate
        values.pop(key, None)
    values["constrained"] = constrained
    values.update(extra)
    for key, value in (("batch_size", batch_size), ("tau", tau), ("threads", threads), ("limit", limit)):
        if value is not None:
            values[key] = value
    name = "args.yaml" if tag == "eval" else f"args_{tag}.yaml"  # the decode stage runs several evaluations
    return d / name, _stage_options(d, values, name, model_name_or_path=model, dataset_name=ctx.prepared,
                                    decoder=decoder, json=d / f"{tag}.json", outputs=d / f"{tag}_outputs.json")


def _evaluate(ctx: Context, d: Path, model: str, decoder: str, tau: float | None = None, tag: str = "eval",
              section: str = "evaluate", constrained: bool = False, batch_size: int | None = None,
              threads: int | None = None, limit: int | None = None, **extra: Any) -> dict:
    from ..commands import evaluate as evaluate_command

    _, values = _evaluate_options(ctx, d, model, decoder, tau, tag, section, constrained, batch_size, threads, limit,
                                  **extra)
    evaluate_command.run(*evaluate_command.parse(values=values))
    return json.loads((d / f"{tag}.json").read_text())


def _eval_stage(stage: Stage) -> Callable[[Context, Path], dict]:
    model_stage, decoder = stage.evaluates, stage.decoder

    def run(ctx: Context, d: Path) -> dict:
        tau = ctx.stage("evaluate").get("tau") if decoder == "block" else None  # None: evaluate's own default
        model = ctx.model(model_stage)
        limit = None  # None: the section's own limit
        cap = pipeline_key(ctx.preset, "evaluate", stage.limit_key) if stage.limit_key else None
        if cap is not None:
            limit = min(int(cap), ctx.stage("evaluate").get("limit") or int(cap))
        if not (ctx.stage("evaluate").get("constrained") and stage.constrained_row):
            return _evaluate(ctx, d, model, decoder, tau, limit=limit)
        # The paper's row stays unconstrained; the constrained row goes beside it. Greedy AR decoding returns a valid
        # unconstrained completion unchanged under the constraint, so its constrained pass decodes the other rows only.
        result = _evaluate(ctx, d, model, decoder, tau, limit=limit)
        reuse = {"reuse_valid_outputs": str(d / "eval_outputs.json")} if decoder == "ar" else {}
        result["constrained"] = _evaluate(ctx, d, model, decoder, tau, tag="constrained", constrained=True,
                                          limit=limit, **reuse)
        return result

    run.__name__ = stage.name
    return run


def stage_decode(ctx: Context, d: Path) -> dict:
    """Accuracy vs speed across tau against AR, measured side by side in one process at the reasoning length.

    With ``constrained: true`` in the decode section every decoder also runs constrained, right after its
    unconstrained run on the same rows, so the overhead of the constraint is measured side by side too. With
    ``compiled_ar: true`` a compiled AR row (static cache + ``torch.compile``) joins, and every speedup is against the
    faster of the two AR rows. ``batch_sizes`` (default: the section's ``batch_size`` alone) repeats every row at
    each batch size on the same rows; speedups compare rows of one batch size."""
    taus = pipeline_key(ctx.preset, "decode", "taus")
    sizes = pipeline_key(ctx.preset, "decode", "batch_sizes") or [None]
    both = [False, True] if ctx.stage("decode").get("constrained") else [False]
    rows = []
    for size in sizes:
        suffix = f"_b{size}" if len(sizes) > 1 else ""
        batch = size if size is not None else ctx.stage("decode").get("batch_size")
        here = []
        for constrained in both:
            res = _evaluate(ctx, d, ctx.model("ar_rl"), "ar", tag=("ar_constrained" if constrained else "ar") + suffix,
                            section="decode", constrained=constrained, batch_size=size)
            here.append({"method": "ar", "tau": None, "constrained": constrained, **_speed_row(res)})
        if pipeline_key(ctx.preset, "decode", "compiled_ar"):  # the fast AR baseline: static cache + torch.compile
            res = _evaluate(ctx, d, ctx.model("ar_rl"), "ar_compiled", tag="ar_compiled" + suffix, section="decode",
                            batch_size=size)
            here.append({"method": "ar_compiled", "tau": None, "constrained": False, **_speed_row(res)})
        for tau in taus:
            for constrained in both:
                tag = (f"tau{tau}_constrained" if constrained else f"tau{tau}") + suffix
                res = _evaluate(ctx, d, ctx.model("rl"), "block", tau, tag=tag, section="decode",
                                constrained=constrained, batch_size=size)
                here.append({"method": "block_diffusion", "tau": tau, "constrained": constrained, **_speed_row(res)})
        # A speedup is claimed against the faster AR row of the same batch size only (eager, or compiled).
        ar_tps = max((r["tokens_per_s"] or 0.0) for r in here if r["method"].startswith("ar") and not r["constrained"])
        for r in here:
            r["batch_size"] = batch
            r["speedup_vs_ar"] = r["tokens_per_s"] / ar_tps if ar_tps else None
            if r["constrained"]:  # decode time against the same decoder unconstrained, on the same rows
                free = next(f for f in here if not f["constrained"] and f["method"] == r["method"] and f["tau"] == r["tau"])
                r["time_vs_unconstrained"] = (r["decode_seconds"] / free["decode_seconds"]
                                              if free["decode_seconds"] else None)
                r["tokens_per_s_vs_unconstrained"] = (r["tokens_per_s"] / free["tokens_per_s"]
                                                      if free["tokens_per_s"] else None)
        rows += here
    return {"rows": rows}


def _speed_row(result: dict) -> dict:
    m = result["metrics"]
    return {
        "tokens_per_s": m.get("tokens_per_s"), "forward_passes": m.get("forward_passes"),
        "tokens_per_forward": m.get("tokens_per_forward", 1.0), "R@1": m.get("R@1"), "valid_rate": m.get("valid_rate"),
        "mean_completion_tokens": m.get("mean_completion_tokens"), "n": result.get("n"),
        "decode_seconds": m.get("decode_seconds"),
    }


def stage_report(ctx: Context, d: Path) -> dict:
    return write_report(ctx.run, ctx.args.preset, ctx.preset)


def _stage_function(stage: Stage) -> Callable[[Context, Path], dict]:
    """What runs ``stage``: an evaluation of the model its table entry names, else this module's ``stage_<name>``."""
    if stage.evaluates is not None:
        return _eval_stage(stage)
    fn = globals().get(f"stage_{stage.name}")
    if fn is None:
        raise RuntimeError(f"pipeline stage {stage.name!r} has no stage_{stage.name} function in {__name__}.")
    return fn


# (name, function) of every stage, in order: derived from the stage table (stages.STAGES).
PIPELINE_STAGES: list[tuple[str, Callable[[Context, Path], dict]]] = [(s.name, _stage_function(s)) for s in STAGES]


def stage_inputs(ctx: Context) -> dict[str, dict[str, Any]]:
    """Every stage's inputs (see :mod:`.fingerprint`), upstream fingerprints included, in pipeline order."""
    out: dict[str, dict[str, Any]] = {}
    fps: dict[str, str] = {}
    for name, (sections, upstream) in STAGE_DEPENDENCIES.items():
        inputs: dict[str, Any] = {"options": {sec: ctx.stage(sec) for sec in sections}}
        if name == "prepare":
            inputs["data"] = data_digest(ctx.args.data_dir)
        if name == "opd":
            inputs["teacher_url"] = ctx.args.teacher_url
        inputs["upstream"] = {u: fps[u] for u in upstream}
        fps[name] = fingerprint(inputs)
        out[name] = inputs
    return out


def _recorded_inputs(run: Path, name: str) -> tuple[bool, dict | None]:
    """(whether the stage left anything, the inputs it recorded) from ``stage.json`` or an interrupted start."""
    for marker in ("stage.json", "inputs.json"):
        p = run / name / marker
        if p.exists():
            return True, json.loads(p.read_text()).get("inputs")
    return False, None


def check_stage_inputs(ctx: Context, planned: list[str], inputs: dict[str, dict]) -> list[str]:
    """Stages among ``planned`` whose recorded inputs differ from ``inputs``; raises unless ``--overwrite``."""
    stale, reasons = [], []
    for name in planned:
        if name not in inputs:
            continue
        exists, recorded = _recorded_inputs(ctx.run, name)
        if exists and (recorded is None or fingerprint(recorded) != fingerprint(inputs[name])):
            stale.append(name)
            reasons.append(f"  {name}: " + "; ".join(describe_changes(recorded, inputs[name])))
    if stale and not ctx.args.overwrite:
        raise UserError(
            f"{ctx.run} holds stages built from other inputs:\n" + "\n".join(reasons)
            + f"\nRe-run with --overwrite to rebuild {', '.join(stale)} (and what depends on them), or use a new --output_dir."
        )
    return stale


def run_pipeline(args: PipelineArguments) -> dict:
    """Run (or resume) every stage; returns ``{stage: record}``.

    Before anything runs, every planned stage's inputs are compared with what its directory recorded
    (:func:`check_stage_inputs`): nothing built from other options, data or upstream models is reused silently.
    """
    preset = load_preset(args.preset, args.overrides)
    ctx = Context(args, preset)
    names = [n for n, _ in PIPELINE_STAGES]
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        raise UserError(f"Unknown stages {unknown}; stages are {names}.")
    planned = [n for n in names if not args.stages or n in args.stages]
    inputs = stage_inputs(ctx)
    stale = check_stage_inputs(ctx, planned, inputs)
    ctx.run.mkdir(parents=True, exist_ok=True)
    for name in stale:
        print(f"--overwrite: removing {ctx.run / name} (its inputs changed)")
        shutil.rmtree(ctx.run / name)
    atomic_write_text(ctx.run / "pipeline.json", json.dumps({"preset": args.preset, "config": preset,
                                                             "args": vars(args)}, indent=2, default=str))
    records = {}
    t_run = time.time()
    for i, (name, fn) in enumerate(PIPELINE_STAGES):
        if args.stages and name not in args.stages:
            continue
        done = stage_record(ctx.run, name)
        if done is not None and name != "report":
            print(f"[{i + 1:2d}/{len(PIPELINE_STAGES)}] {name}: done earlier ({done['wall_s']:.0f} s), skipped")
            records[name] = done
            continue
        d = ctx.make_stage_dir(name)
        earlier = _earlier_attempts(d)
        again = f"; resuming: {len(earlier)} earlier attempt(s), {sum(earlier):.0f} s" if earlier else ""
        print(f"[{i + 1:2d}/{len(PIPELINE_STAGES)}] {name} ... (run time so far {(time.time() - t_run) / 60:.1f} min"
              f"{again})", flush=True)
        t0 = time.time()
        provenance = {"fingerprint": fingerprint(inputs[name]), "inputs": inputs[name]} if name in inputs else {}
        if provenance:  # an interrupted stage leaves this behind, so its checkpoints are never resumed blindly
            atomic_write_text(d / "inputs.json", json.dumps(provenance, indent=2, default=str))
        try:
            metrics = fn(ctx, d)
        except KeyboardInterrupt:
            seconds = time.time() - t0
            atomic_write_text(d / ATTEMPTS, json.dumps([*earlier, round(seconds, 1)]))
            finished = [n for n, _ in PIPELINE_STAGES if n != name and stage_record(ctx.run, n) is not None]
            raise PipelineInterrupted(_interrupted_message(ctx, name, seconds, finished)) from None
        # wall time adds up across attempts: an interrupted-then-resumed stage reports all the time it took
        record = {"stage": name, "status": "done", "wall_s": time.time() - t0 + sum(earlier), **provenance,
                  "metrics": metrics}
        if earlier:
            record["attempts"] = len(earlier) + 1
        atomic_write_text(d / "stage.json", json.dumps(record, indent=2, default=str))
        (d / ATTEMPTS).unlink(missing_ok=True)
        records[name] = record
        print(f"[{i + 1:2d}/{len(PIPELINE_STAGES)}] {name}: {summary_line(name, metrics)} ({record['wall_s']:.0f} s)",
              flush=True)
    return records


def summary_line(name: str, metrics: dict) -> str:
    m = metrics.get("metrics") if isinstance(metrics, dict) else None
    if m and "R@1" in m:
        return f"R@1 {m['R@1']:.4f} R@3 {m.get('R@3', float('nan')):.4f} valid {m.get('valid_rate', float('nan')):.3f}"
    if name == "decode":
        return " | ".join(f"{r['method']}{'' if r['tau'] is None else ' tau=' + str(r['tau'])}"
                          f"{', constrained' if r.get('constrained') else ''}: {(r['tokens_per_s'] or 0):.1f} tok/s"
                          for r in metrics.get("rows", []))
    return "ok"
