"""``RUN/report.md``, ``RUN/report.json`` and PNG plots from the stage records of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text
from .stages import STAGE_NAMES, STAGES, stage_record
from .validate import DEFAULT_TARGETS

# (row label, stage whose eval holds it), from the stage table; the pre-rank floor comes from any eval's "prerank".
TABLE_ROWS = [(s.report_row, s.name) for s in STAGES if s.report_row is not None]
METRICS = ["R@1", "R@3", "R@5", "N@3", "N@5"]
CURVES = {"ar_sft": "AR SFT", "ar_rl": "AR RL (DAPO)", "cft": "CFT", "opd": "OPD", "rl": "diffusion GRPO"}


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _log_history(record: dict | None) -> list[dict]:
    if not record:
        return []
    m = record.get("metrics") or {}
    return m.get("log_history") or m.get("history") or []


def _plot_curves(run: Path, records: dict[str, dict | None]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for stage, title in CURVES.items():
        hist = [h for h in _log_history(records.get(stage)) if "step" in h]
        keys = [k for k in ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "loss_answer",
                            "loss_reasoning") if any(k in h for h in hist)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(h["step"], h[key]) for h in hist if key in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
            ax.set_title(f"{title}: {key}")
            ax.set_xlabel("step")
        fig.tight_layout()
        path = run / f"curve_{stage}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    return made


def _plot_speed(run: Path, rows: list[dict]) -> str | None:
    pts = [r for r in rows if r.get("tokens_per_s") and r.get("R@1") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    # A legend, not annotations: points of one run often share an R@1, and labels on top of each other are unreadable.
    markers = "osD^v<>ph*"
    for i, r in enumerate(pts):
        label = ({"ar": "AR", "ar_compiled": "AR compiled"}.get(r["method"]) or f"block diffusion, tau={r['tau']}") + (
            ", constrained" if r.get("constrained") else "") + (f", batch {r['batch_size']}" if r.get("batch_size") else "")
        ax.scatter(r["tokens_per_s"], r["R@1"], s=40, marker=markers[i % len(markers)], label=label)
    ax.legend(fontsize=7, loc="best")
    if len({r.get("batch_size") for r in pts}) > 1:  # batch 32 decodes ~10x the tokens/s of batch 1
        ax.set_xscale("log")
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("R@1")
    ax.set_title("accuracy vs decode speed")
    fig.tight_layout()
    path = run / "accuracy_vs_speed.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


CONSTRAINED = ":constrained"  # suffix of a stage's constrained row in the CI table


REFERENCE_STAGES = ("baseline", "reference")  # rows computed without a model: RUN/<stage>/eval.json


def _eval_rows(run: Path, stage: str) -> dict[str, list] | None:
    """``{"users", "ranks", "prerank", "rankings", "copy_rate"}`` of one evaluation stage's rows (``rankings[i]``: the
    parsed ranking, ``None`` when invalid; ``copy_rate``: share of the valid rankings that are the pre-rank order), or
    ``None`` when it wrote none. ``STAGE:constrained`` reads that stage's constrained
    evaluation."""
    if stage in REFERENCE_STAGES:
        p = run / stage / "eval.json"
        if not p.exists():
            return None
        r = json.loads(p.read_text())
        return {"users": r["user_ids"], "ranks": r["ranks"], "prerank": r["prerank_ranks"],
                "rankings": r.get("rankings"), "copy_rate": (r.get("metrics") or {}).get("copy_rate")}
    stage, constrained, _ = stage.partition(CONSTRAINED)
    p = run / stage / ("constrained_outputs.json" if constrained else "eval_outputs.json")
    if not p.exists():
        return None
    recs = json.loads(p.read_text())
    if not recs or "prerank_rank" not in recs[0]:
        return None
    copies = [r["copy"] for r in recs if r.get("valid") and "copy" in r]
    return {"users": [r["user_id"] for r in recs], "ranks": [r["rank"] for r in recs],
            "prerank": [r["prerank_rank"] for r in recs],
            "rankings": [r["ranking"] for r in recs] if "ranking" in recs[0] else None,
            "copy_rate": sum(copies) / len(copies) if copies else None}


def _eval_ranks(run: Path, stage: str) -> tuple[list[int], list[int], list[int]] | None:
    """(user ids, ranks, pre-rank ranks) of one evaluation stage's rows (:func:`_eval_rows`)."""
    r = _eval_rows(run, stage)
    return None if r is None else (r["users"], r["ranks"], r["prerank"])


def _teacher_stage(stage: str) -> str:
    return "eval_ar" + (CONSTRAINED if stage.endswith(CONSTRAINED) else "")


def _confidence_intervals(run: Path, stages: list[str]) -> dict[str, dict]:
    """Per row of the table: paired bootstrap 95% CIs of its R@1 and R@3 differences to the floor and its R@1
    difference to the AR teacher (same rows); its copy rate; and its agreement with the AR teacher (top-1, exact,
    Kendall's tau over the rows where both rankings are valid). A constrained row (``STAGE:constrained``) is compared
    with the constrained AR teacher, like with like."""
    from ..rerank.metrics import paired_bootstrap_ci, ranking_agreement

    stages = [*stages, *(s + CONSTRAINED for s in stages)]
    rows = {s: _eval_rows(run, s) for s in stages}
    out: dict[str, dict] = {}
    for stage, r in rows.items():
        if r is None:
            continue
        out[stage] = {"vs_floor": paired_bootstrap_ci(r["ranks"], r["prerank"]),
                      "r3_vs_floor": paired_bootstrap_ci(r["ranks"], r["prerank"], metric="R@3")}
        rankings = r.get("rankings")
        out[stage]["copy_rate"] = r.get("copy_rate")
        teacher = rows.get(_teacher_stage(stage))
        if teacher is not None and stage != _teacher_stage(stage) and teacher["users"] == r["users"]:
            out[stage]["vs_teacher"] = paired_bootstrap_ci(r["ranks"], teacher["ranks"])
            if rankings is not None and teacher.get("rankings") is not None:
                out[stage]["agreement"] = ranking_agreement(rankings, teacher["rankings"])
    gain = _agreement_gain(rows.get("eval_opd"), rows.get("eval_cft"), rows.get("eval_ar"))
    if gain is not None:
        out["opd_vs_cft_agreement"] = gain
    after, before = rows.get("eval_ar"), rows.get("eval_sft")
    if after and before and after["users"] == before["users"]:  # what GR2's RL did to the teacher, row by row
        out["teacher_rl_vs_sft"] = {m: paired_bootstrap_ci(after["ranks"], before["ranks"], metric=m)
                                    for m in ("R@1", "R@3")}
    return out


def _agreement_gain(student: dict | None, before: dict | None, teacher: dict | None) -> dict | None:
    """Paired bootstrap CI of the difference in top-1 agreement with the teacher between two students, over the rows
    where the teacher's ranking is valid (a student's invalid ranking counts as disagreeing)."""
    from ..rerank.metrics import paired_bootstrap_mean_ci

    if not (student and before and teacher) or any(x.get("rankings") is None for x in (student, before, teacher)):
        return None
    if not (student["users"] == before["users"] == teacher["users"]):
        return None

    def top1(x: list | None, t: list) -> float:
        return float(x is not None and x[0] == t[0])

    keep = [i for i, t in enumerate(teacher["rankings"]) if t is not None]
    if not keep:
        return None
    return paired_bootstrap_mean_ci([top1(student["rankings"][i], teacher["rankings"][i]) for i in keep],
                                    [top1(before["rankings"][i], teacher["rankings"][i]) for i in keep])


def _fmt_share(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"  # x != x: nan (no row where both rankings are valid)


def _fmt_ci(ci: dict | None) -> str:
    if not ci:
        return "-"
    return f"{ci['diff'] * 100:+.1f} [{ci['lo'] * 100:+.1f}, {ci['hi'] * 100:+.1f}]"


def _schedule(record: dict) -> str:
    """How an evaluation record decoded a block student: ``tau=0.9`` or ``tau=0.95, sub-blocks of 4``."""
    if record.get("tau") is None:
        return "the evaluated schedule"
    text = f"tau={record['tau']}"
    return text + (f", sub-blocks of {record['block_size']}" if record.get("block_size") else "")


def _targets(evals: dict, floor: dict | None, decode_rows: list[dict], cis: dict, wanted: dict | None,
             wall_s: dict[str, float] | None = None) -> list[dict]:
    """The preset's acceptance targets (its ``targets`` section), each with the measured value and whether it holds.

    A target that holds only because every row sits on the floor (no valid ranking anywhere) says so. A target key
    set to ``null`` in the preset is left out.
    """
    wanted = {**DEFAULT_TARGETS, **(wanted or {})}
    final = (evals.get("eval_rl") or {}).get("metrics")
    student = evals.get("eval_rl") or evals.get("eval_cft") or {}  # how the students were decoded
    schedule = _schedule(student)
    teacher = (evals.get("eval_ar") or {}).get("metrics")
    naive = (evals.get("eval_naive") or {}).get("metrics")
    on_floor = bool(teacher and final and not teacher.get("valid_rate") and not final.get("valid_rate"))
    out = []

    def add(target: str, measured: str, met: bool, vacuous: bool = False) -> None:
        out.append({"target": target, "measured": measured, "met": met,
                    **({"note": "holds only because every row sits on the floor"} if vacuous and met else {})})

    if teacher and wanted.get("teacher_valid") is not None:
        add(f"AR teacher valid >= {wanted['teacher_valid']:.0%} (unconstrained)", f"{teacher['valid_rate']:.1%}",
            teacher["valid_rate"] >= wanted["teacher_valid"])
    if teacher and floor and wanted.get("teacher_gain_points") is not None:
        ci = (cis.get("eval_ar") or {}).get("vs_floor")
        gain = teacher["R@1"] - floor["R@1"]
        met = gain * 100 >= wanted["teacher_gain_points"] and bool(ci) and ci["lo"] > 0
        add(f"AR teacher R@1 >= floor + {wanted['teacher_gain_points']} points, 95% CI excluding 0",
            f"{gain * 100:+.2f} points, CI {_fmt_ci(ci)}", met)
    if teacher and floor and wanted.get("teacher_r1_ci_lo_points") is not None:
        ci = (cis.get("eval_ar") or {}).get("vs_floor")
        lo, gain_min = wanted["teacher_r1_ci_lo_points"], wanted.get("teacher_r1_min_gain_points") or 0.0
        gain = (teacher["R@1"] - floor["R@1"]) * 100
        met = gain >= gain_min and bool(ci) and ci["lo"] * 100 >= lo
        add(f"AR teacher R@1 >= floor + {gain_min:g} point{'s' if gain_min != 1 else ''}, lower end of its 95% CI "
            f">= {lo:+.1f} point", f"{gain:+.2f} points, CI {_fmt_ci(ci)}", met, vacuous=not teacher.get("valid_rate"))
    if teacher and floor and wanted.get("teacher_r3_gain_points") is not None and "R@3" in floor:
        gain3 = (teacher["R@3"] - floor["R@3"]) * 100
        ci3 = (cis.get("eval_ar") or {}).get("r3_vs_floor")
        lo3 = wanted.get("teacher_r3_ci_lo_points")
        met = gain3 >= wanted["teacher_r3_gain_points"] and (lo3 is None or (bool(ci3) and ci3["lo"] * 100 > lo3))
        add(f"AR teacher R@3 >= floor + {wanted['teacher_r3_gain_points']} point"
            + (f", lower end of its 95% CI > {lo3:+.1f}" if lo3 is not None else ""),
            f"{gain3:+.2f} points" + (f", CI {_fmt_ci(ci3)}" if ci3 else ""), met)
    copy = (cis.get("eval_ar") or {}).get("copy_rate")
    if copy is not None and wanted.get("teacher_copy_rate_max") is not None:
        add(f"AR teacher copy rate < {wanted['teacher_copy_rate_max']:.0%} (valid rankings equal to the pre-rank order)",
            f"{copy:.1%}", copy < wanted["teacher_copy_rate_max"])
    reference = (evals.get("reference") or {}).get("metrics")
    if reference and floor and wanted.get("reference_r1_gain_points") is not None:
        gain = (reference["R@1"] - floor["R@1"]) * 100
        add(f"evidence ranker (the traces' procedure) R@1 >= floor + {wanted['reference_r1_gain_points']} points",
            f"{gain:+.2f} points, CI {_fmt_ci((cis.get('reference') or {}).get('vs_floor'))}",
            gain >= wanted["reference_r1_gain_points"])
    cft = (evals.get("eval_cft") or {}).get("metrics")
    if cft and wanted.get("cft_valid") is not None:
        add(f"+ CFT valid >= {wanted['cft_valid']:.0%} at {schedule}", f"{cft['valid_rate']:.1%}",
            cft["valid_rate"] >= wanted["cft_valid"])
    if cft and wanted.get("cft_tokens_per_forward") is not None:
        tpf = cft.get("tokens_per_forward") or 0.0
        add(f"+ CFT tokens per forward >= {wanted['cft_tokens_per_forward']} at {schedule}", f"{tpf:.2f}",
            tpf >= wanted["cft_tokens_per_forward"])
    if final and teacher and wanted.get("final_vs_teacher") is not None:
        ratio = final["R@1"] / teacher["R@1"] if teacher["R@1"] else float("nan")
        add(f"final R@1 >= {wanted['final_vs_teacher']:.0%} of the AR teacher's", f"{ratio:.1%}",
            ratio >= wanted["final_vs_teacher"], vacuous=on_floor)
    if final and teacher and floor and wanted.get("final_r3_vs_teacher") is not None:
        t3, f3 = teacher["R@3"] - floor["R@3"], final["R@3"] - floor["R@3"]
        share = f3 / t3 if t3 > 0 else float("nan")
        add(f"final ΔR@3 >= {wanted['final_r3_vs_teacher']:.0%} of the AR teacher's",
            f"{f3 * 100:+.2f} vs {t3 * 100:+.2f} points" + (f" ({share:.0%})" if t3 > 0 else " (teacher gains nothing)"),
            t3 > 0 and f3 >= wanted["final_r3_vs_teacher"] * t3)
    agree = (cis.get("eval_rl") or {}).get("agreement")
    if agree and wanted.get("final_top1_agreement") is not None:
        add(f"final top-1 agreement with the AR teacher >= {wanted['final_top1_agreement']:.0%}",
            f"{agree['top1']:.1%} of {agree['n']} rows", agree["top1"] >= wanted["final_top1_agreement"])
    opd_gain = cis.get("opd_vs_cft_agreement")
    if opd_gain and wanted.get("opd_agreement_ci_lo_points") is not None:
        lo = wanted["opd_agreement_ci_lo_points"]
        add(f"OPD raises top-1 agreement with the AR teacher over CFT, lower end of its 95% CI > {lo:+.1f} points",
            f"{_fmt_ci(opd_gain)} points", opd_gain["lo"] * 100 > lo)
    if final and wanted.get("final_valid") is not None:
        add(f"final valid >= {wanted['final_valid']:.1%} at {schedule}", f"{final['valid_rate']:.1%}",
            final["valid_rate"] >= wanted["final_valid"])
    constrained = {stage: e["constrained"]["metrics"] for stage, e in evals.items() if e and e.get("constrained")}
    if constrained and wanted.get("constrained_valid") is not None:
        worst = min(constrained, key=lambda s: constrained[s]["valid_rate"])
        add(f"constrained decoding valid >= {wanted['constrained_valid']:.1%} for every model",
            f"lowest {constrained[worst]['valid_rate']:.1%} ({worst})",
            constrained[worst]["valid_rate"] >= wanted["constrained_valid"])
    overheads = [r for r in decode_rows if r.get("constrained") and r.get("time_vs_unconstrained")]
    if overheads and wanted.get("constrained_overhead") is not None:
        worst_row = max(overheads, key=lambda r: r["time_vs_unconstrained"])
        name = "AR" if worst_row["method"] == "ar" else f"tau={worst_row['tau']}"
        add(f"constrained decode time <= {wanted['constrained_overhead']:.2f}x unconstrained (both decoders)",
            f"highest {worst_row['time_vs_unconstrained']:.2f}x ({name})",
            worst_row["time_vs_unconstrained"] <= wanted["constrained_overhead"])
    drop = wanted.get("constrained_r1_drop_points")
    if drop is not None:
        pairs = {s: (e["metrics"]["R@1"], e["constrained"]["metrics"]["R@1"]) for s, e in evals.items()
                 if e and e.get("constrained") and s != "baseline"}
        if pairs:
            worst = min(pairs, key=lambda s: pairs[s][1] - pairs[s][0])
            delta = (pairs[worst][1] - pairs[worst][0]) * 100
            add(f"constrained R@1 >= unconstrained R@1 - {drop} point, every model", f"worst {delta:+.2f} points "
                f"({worst})", delta >= -drop)
    minutes = {k: v / 60 for k, v in (wall_s or {}).items()}
    if minutes and wanted.get("teacher_minutes") is not None:
        teacher_min = sum(minutes.get(k, 0.0) for k in ("ar_mid", "ar_sft", "ar_rl"))
        add(f"AR teacher (mid-training + SFT + RL) <= {wanted['teacher_minutes']} min", f"{teacher_min:.1f} min",
            teacher_min <= wanted["teacher_minutes"])
    if minutes and wanted.get("total_minutes") is not None:
        total = sum(minutes.values())
        add(f"whole pipeline <= {wanted['total_minutes']} min", f"{total:.1f} min", total <= wanted["total_minutes"])
    # speedup_vs_ar is against the faster AR row of the same batch size (compiled when the decode section measured it)
    # at the tau the students are evaluated with (the decode stage's first tau when there is no evaluation)
    tau = student.get("tau") or next(
        (r["tau"] for r in decode_rows if r.get("tau") is not None), None)
    at_tau = [r for r in decode_rows if r.get("tau") == tau and not r.get("constrained")]
    for r in at_tau if wanted.get("speedup") is not None else []:
        sp = r.get("speedup_vs_ar") or 0.0
        at = f", batch {r['batch_size']}" if len(at_tau) > 1 and r.get("batch_size") else ""
        add(f"decode speedup vs AR >= {wanted['speedup']}x at tau={tau}{at}", f"{sp:.2f}x", sp >= wanted["speedup"])
    if naive and wanted.get("naive_valid_max") is not None:
        add(f"naive conversion valid < {wanted['naive_valid_max']:.0%} (the structural gap)",
            f"{naive['valid_rate']:.1%}", naive["valid_rate"] < wanted["naive_valid_max"])
    return out


def _dataset_name(data: dict) -> str:
    """The dataset the run prepared (its file stem, ``NAME`` of ``NAME.txt``), from the prepare stage's record."""
    return (((data.get("inputs") or {}).get("data") or {}).get("dataset")) or "dataset not recorded"


def _teacher_model(config: dict[str, Any]) -> str:
    """What the AR teacher started from: a named checkpoint, or an architecture and shape built from a config."""
    for stage in ("ar_mid", "ar_sft"):
        section = config.get(stage) or {}
        if section.get("model_name_or_path"):
            return f"`{section['model_name_or_path']}` (pretrained)"
    section = {**(config.get("ar_mid") or {}), **(config.get("ar_sft") or {})}
    return f"{section.get('arch', 'qwen3')} `{section.get('shape', 'mini')}`, built from a config (no pretrained weights)"


def _run_table(dataset: str, preset: str, config: dict[str, Any], data: dict, n: int | None,
               decode_rows: list[dict]) -> list[str]:
    """What the run is: dataset, preset, teacher model and the rows each kind of figure is computed on."""
    stats, rows = data.get("stats") or {}, data.get("rows") or {}
    size = (f" ({stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions)"
            if {"users", "items", "interactions"} <= set(stats) else "")
    n_test = rows.get("test")
    n_decode = next((r.get("n") for r in decode_rows if r.get("n")), None)
    out = ["| run | |", "|---|---|", f"| dataset | {dataset}{size} |", f"| preset | `{preset}` |",
           f"| AR teacher model | {_teacher_model(config)} |"]
    if rows.get("train") is not None:
        out.append(f"| training rows (re-ranking) | {rows['train']:,} prepared train rows |")
    if n is not None:
        out.append(f"| accuracy table rows | {n:,} test rows" + (f" of {n_test:,}" if n_test else "") + " |")
    if n_decode is not None:
        out.append(f"| accuracy-vs-speed rows | {n_decode:,} test rows (the first of those above) |")
    return out + [""]


def _teacher_rl_section(evals: dict, cis: dict) -> list[str]:
    """The AR teacher before and after GR2's RL on the same rows: R@k differences with paired CIs, validity, copy
    rate (empty when the run has no pre-RL evaluation)."""
    rl = cis.get("teacher_rl_vs_sft")
    before, after = (evals.get("eval_sft") or {}).get("metrics"), (evals.get("eval_ar") or {}).get("metrics")
    if not (rl and before and after):
        return []
    copy = [(cis.get(s) or {}).get("copy_rate") for s in ("eval_sft", "eval_ar")]
    return ["", "## The AR teacher before and after GR2's RL (same rows, unconstrained)", "",
            "| | before RL (SFT) | after RL | after - before [95% CI] |", "|---|---|---|---|",
            f"| R@1 | {_fmt(before['R@1'])} | {_fmt(after['R@1'])} | {_fmt_ci(rl['R@1'])} |",
            f"| R@3 | {_fmt(before['R@3'])} | {_fmt(after['R@3'])} | {_fmt_ci(rl['R@3'])} |",
            f"| valid | {_fmt(before['valid_rate'], 3)} | {_fmt(after['valid_rate'], 3)} | "
            f"{(after['valid_rate'] - before['valid_rate']) * 100:+.1f} |",
            f"| copy rate | {_fmt(copy[0], 3)} | {_fmt(copy[1], 3)} | - |"]


def write_report(run: str | Path, preset: str, config: dict[str, Any]) -> dict:
    """Write ``report.md``, ``report.json`` and the plots into the run directory ``run``, from its stage records
    (:func:`~diffgr2_trl.pipeline.stages.stage_record`); ``preset`` is the preset's name and ``config`` the resolved
    preset (its ``targets`` section sets the acceptance targets). Returns ``{"report": path of report.md}``."""
    run = Path(run)
    records = {name: stage_record(run, name) for name in STAGE_NAMES}
    evals = {stage: (records[stage] or {}).get("metrics") for _, stage in TABLE_ROWS}
    floor = next((e["prerank"] for e in evals.values() if e and e.get("prerank")), None)
    n = max((e["n"] for e in evals.values() if e and e.get("n")), default=None)
    decode_rows = ((records.get("decode") or {}).get("metrics") or {}).get("rows", [])
    data = (records.get("prepare") or {}).get("metrics") or {}

    cis = _confidence_intervals(run, [stage for _, stage in TABLE_ROWS])
    dataset = _dataset_name(data)
    lines = [f"# Diffusion-GR2 pipeline report: {dataset}, preset `{preset}` (`{run}`)", ""]
    if preset == "smoke":
        lines += ["**Smoke run: a plumbing check only.** Tiny models trained for seconds on a tiny slice; the numbers "
                  "below say the stages run end to end, nothing about the method.", ""]
    lines += _run_table(dataset, preset, config, data, n, decode_rows)
    fewer = sorted({e["n"] for e in evals.values() if e and e.get("n") and e["n"] != n})
    lines += [f"Test rows evaluated: {n} (the same rows for every row of the table"
              + (", except the rows that name fewer: the first rows of the same split, with their CIs against the "
                 "floor on those rows" if fewer else "")
              + "). Invalid outputs fall back to the pre-rank order for the ranking metrics and are counted in the "
              "validity columns.", "",
              "Glossary: *floor* = the pre-ranker's own order of the 10 candidates (what a re-ranker must beat); "
              "*R@k* = share of rows with the target in the top k; *N@k* = NDCG@k with one relevant item "
              "(1/log2(rank+2)); *valid* = share of outputs that parse as a permutation of the candidates; "
              "*ΔR@1 [95% CI]* = R@1 difference in points with its paired bootstrap interval (2,000 resamples); "
              "*copy rate* = share of the valid rankings that are the pre-rank order verbatim; *agreement* = with the "
              "AR teacher (the constrained teacher for constrained rows) over the rows where both rankings are valid: "
              "same first item, same full ranking, mean Kendall's tau.", ""]
    errs = sorted({k for e in evals.values() if e for k in (e["metrics"].get("errors") or {})}
                  | {k for e in evals.values() if e and e.get("constrained")
                     for k in (e["constrained"]["metrics"].get("errors") or {})})
    header = ["row", *METRICS, "valid", "ΔR@1 vs floor", "ΔR@3 vs floor", "ΔR@1 vs AR teacher", "copy rate",
              "top-1 agreement", "exact agreement", "Kendall τ", *errs]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if floor:
        lines.append("| pre-rank order (floor) | " + " | ".join(_fmt(floor.get(k)) for k in METRICS) + " | - | - | - | - |"
                     " 1.000 | - | - | - |" + " - |" * len(errs))
    for label, stage in TABLE_ROWS:
        e = evals.get(stage)
        if not e:
            lines.append(f"| {label} | " + " | ".join("-" for _ in header[1:]) + " |")
            continue
        if e.get("n") and n and e["n"] != n:
            label = f"{label} (first {e['n']:,} rows)"
        paired = [(label, e["metrics"], cis.get(stage) or {})]
        if e.get("constrained"):  # the constrained row goes right under the paper's (unconstrained) one
            paired.append((f"{label}, constrained", e["constrained"]["metrics"], cis.get(stage + CONSTRAINED) or {}))
        for row_label, m, ci in paired:
            err = m.get("errors") or {}
            agree = ci.get("agreement") or {}
            lines.append(f"| {row_label} | " + " | ".join(_fmt(m.get(k)) for k in METRICS)
                         + f" | {_fmt(m.get('valid_rate'), 3)} | {_fmt_ci(ci.get('vs_floor'))} | "
                         + f"{_fmt_ci(ci.get('r3_vs_floor'))} | {_fmt_ci(ci.get('vs_teacher'))} | "
                         + f"{_fmt(ci.get('copy_rate'), 3)} | {_fmt_share(agree.get('top1'))} | "
                         + f"{_fmt_share(agree.get('exact'))} | {_fmt_share(agree.get('kendall_tau'))} | "
                         + " | ".join(_fmt(err.get(k, 0)) for k in errs) + " |")
    if decode_rows:
        n_speed = next((r.get("n") for r in decode_rows if r.get("n")), None)
        batches = sorted({r["batch_size"] for r in decode_rows if r.get("batch_size")})
        shown = f"batch {' and '.join(map(str, batches))}" if batches else "batch 1"
        lines += ["", f"## Accuracy vs speed ({n_speed} test rows, {shown}, AR and block diffusion measured side by "
                  "side in one run; speedups against AR at the same batch size; R@1 here is over these rows only)", "",
                  "| decoder | batch | tokens/s | forward passes | tokens/forward | speedup vs AR | R@1 | valid "
                  "| mean tokens | decode time vs unconstrained |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in decode_rows:
            label = {"ar": "AR (teacher, KV cache)", "ar_compiled": "AR (teacher, static cache + torch.compile)"}.get(
                r["method"], f"block diffusion tau={r['tau']}")
            label += ", constrained" if r.get("constrained") else ""
            ratio = r.get("time_vs_unconstrained")
            lines.append(f"| {label} | {_fmt(r.get('batch_size'))} | {_fmt(r.get('tokens_per_s'), 1)} | "
                         f"{_fmt(r.get('forward_passes'))} | "
                         f"{_fmt(r.get('tokens_per_forward'), 2)} | {_fmt(r.get('speedup_vs_ar'), 2)}x | "
                         f"{_fmt(r.get('R@1'))} | {_fmt(r.get('valid_rate'), 3)} | {_fmt(r.get('mean_completion_tokens'), 1)} | "
                         f"{_fmt(ratio, 2) + 'x' if ratio else '-'} |")
    lines += _teacher_rl_section(evals, cis)
    targets = _targets(evals, floor, decode_rows, cis, config.get("targets"),
                       {k: v["wall_s"] for k, v in records.items() if v and v.get("wall_s") is not None})
    if targets:
        lines += ["", f"## Targets (preset `{preset}`)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'}"
                  f"{' (' + t['note'] + ')' if t.get('note') else ''} |" for t in targets]
    plots = _plot_curves(run, records)
    speed_plot = _plot_speed(run, decode_rows)
    if plots or speed_plot:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in ([speed_plot] if speed_plot else []) + plots]
    wall = {k: round(v["wall_s"], 1) for k, v in records.items() if v}
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in wall.items()]
    if data:
        lines += ["", f"## Data: {dataset} (full details in report.json)", "",
                  "| split | prepared rows | floor R@1 | floor R@3 | floor computed on (rows) |", "|---|---|---|---|---|"]
        for split, rows in (data.get("rows") or {}).items():
            fl = (data.get("floor") or {}).get(split) or {}
            lines.append(f"| {split} | {rows} | {_fmt(fl.get('R@1'))} | {_fmt(fl.get('R@3'))} | {fl.get('n', '-')} |")
        lines += ["", "The floor of a split is computed on all of its rows; `prepared rows` can be fewer where the preset "
                  "subsamples the training rows (`prepare.max_train_examples`)."]
    report = {
        "stages": {k: (v or {}).get("metrics") for k, v in records.items() if v and k != "report"},
        "decode": decode_rows,
        "config": config,
        "dataset": dataset,
        "data": data,
        "wall_s": wall,
        "floor": floor,
        "confidence_intervals": cis,
        "targets": targets,
    }
    for stage in list(report["stages"]):
        if isinstance(report["stages"][stage], dict):
            report["stages"][stage] = {k: v for k, v in report["stages"][stage].items() if k != "log_history"}
    atomic_write_text(run / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(run / "report.json", json.dumps(report, indent=2, default=str))
    return {"report": str(run / "report.md")}
