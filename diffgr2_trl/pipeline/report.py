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
        keys = [k for k in ("loss", "reward", "kl", "loss_answer", "loss_reasoning") if any(k in h for h in hist)]
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


def _eval_ranks(run: Path, stage: str) -> tuple[list[int], list[int], list[int]] | None:
    """(user ids, ranks, pre-rank ranks) of one evaluation stage's rows, or ``None`` when it wrote none.
    ``STAGE:constrained`` reads that stage's constrained evaluation."""
    if stage == "baseline":
        p = run / "baseline" / "eval.json"
        if not p.exists():
            return None
        r = json.loads(p.read_text())
        return r["user_ids"], r["ranks"], r["prerank_ranks"]
    stage, constrained, _ = stage.partition(CONSTRAINED)
    p = run / stage / ("constrained_outputs.json" if constrained else "eval_outputs.json")
    if not p.exists():
        return None
    recs = json.loads(p.read_text())
    if not recs or "prerank_rank" not in recs[0]:
        return None
    return [r["user_id"] for r in recs], [r["rank"] for r in recs], [r["prerank_rank"] for r in recs]


def _confidence_intervals(run: Path, stages: list[str]) -> dict[str, dict]:
    """Paired bootstrap 95% CIs of each row's R@1 difference to the floor and to the AR teacher (same rows); a
    constrained row (``STAGE:constrained``) is compared with the constrained AR teacher, like with like."""
    from ..rerank.metrics import paired_bootstrap_ci

    stages = [*stages, *(s + CONSTRAINED for s in stages)]
    ranks = {s: _eval_ranks(run, s) for s in stages}
    out: dict[str, dict] = {}
    for stage, r in ranks.items():
        if r is None:
            continue
        users, rk, pre = r
        teacher_stage = "eval_ar" + (CONSTRAINED if stage.endswith(CONSTRAINED) else "")
        teacher = ranks.get(teacher_stage)
        out[stage] = {"vs_floor": paired_bootstrap_ci(rk, pre)}
        if teacher is not None and stage != teacher_stage and teacher[0] == users:
            out[stage]["vs_teacher"] = paired_bootstrap_ci(rk, teacher[1])
    return out


def _fmt_ci(ci: dict | None) -> str:
    if not ci:
        return "-"
    return f"{ci['diff'] * 100:+.1f} [{ci['lo'] * 100:+.1f}, {ci['hi'] * 100:+.1f}]"


def _targets(evals: dict, floor: dict | None, decode_rows: list[dict], cis: dict, wanted: dict | None,
             wall_s: dict[str, float] | None = None) -> list[dict]:
    """The preset's acceptance targets (its ``targets`` section), each with the measured value and whether it holds.

    A target that holds only because every row sits on the floor (no valid ranking anywhere) says so. A target key
    set to ``null`` in the preset is left out.
    """
    wanted = {**DEFAULT_TARGETS, **(wanted or {})}
    final = (evals.get("eval_rl") or {}).get("metrics")
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
        lo = wanted["teacher_r1_ci_lo_points"]
        met = teacher["R@1"] >= floor["R@1"] and bool(ci) and ci["lo"] * 100 >= lo
        add(f"AR teacher R@1 >= floor, lower end of its 95% CI >= {lo:+.1f} point", f"CI {_fmt_ci(ci)}", met,
            vacuous=not teacher.get("valid_rate"))
    if teacher and floor and wanted.get("teacher_r3_gain_points") is not None and "R@3" in floor:
        gain3 = (teacher["R@3"] - floor["R@3"]) * 100
        add(f"AR teacher R@3 >= floor + {wanted['teacher_r3_gain_points']} point", f"{gain3:+.2f} points",
            gain3 >= wanted["teacher_r3_gain_points"])
    cft = (evals.get("eval_cft") or {}).get("metrics")
    if cft and wanted.get("cft_valid") is not None:
        add(f"+ CFT valid >= {wanted['cft_valid']:.0%} at tau=0.9", f"{cft['valid_rate']:.1%}",
            cft["valid_rate"] >= wanted["cft_valid"])
    if cft and wanted.get("cft_tokens_per_forward") is not None:
        tpf = cft.get("tokens_per_forward") or 0.0
        add(f"+ CFT tokens per forward >= {wanted['cft_tokens_per_forward']} at tau=0.9", f"{tpf:.2f}",
            tpf >= wanted["cft_tokens_per_forward"])
    if final and teacher and wanted.get("final_vs_teacher") is not None:
        ratio = final["R@1"] / teacher["R@1"] if teacher["R@1"] else float("nan")
        add(f"final R@1 >= {wanted['final_vs_teacher']:.0%} of the AR teacher's", f"{ratio:.1%}",
            ratio >= wanted["final_vs_teacher"], vacuous=on_floor)
    if final and wanted.get("final_valid") is not None:
        add(f"final valid >= {wanted['final_valid']:.1%} at tau=0.9", f"{final['valid_rate']:.1%}",
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
        teacher_min = sum(minutes.get(k, 0.0) for k in ("ar_mid", "ar_sft"))
        add(f"AR teacher (mid-training + SFT) <= {wanted['teacher_minutes']} min", f"{teacher_min:.1f} min",
            teacher_min <= wanted["teacher_minutes"])
    if minutes and wanted.get("total_minutes") is not None:
        total = sum(minutes.values())
        add(f"whole pipeline <= {wanted['total_minutes']} min", f"{total:.1f} min", total <= wanted["total_minutes"])
    # speedup_vs_ar is against the faster AR row of the same batch size (compiled when the decode section measured it)
    tau09 = [r for r in decode_rows if r.get("tau") == 0.9 and not r.get("constrained")]
    for r in tau09 if wanted.get("speedup") is not None else []:
        sp = r.get("speedup_vs_ar") or 0.0
        at = f", batch {r['batch_size']}" if len(tau09) > 1 and r.get("batch_size") else ""
        add(f"decode speedup vs AR >= {wanted['speedup']}x at tau=0.9{at}", f"{sp:.2f}x", sp >= wanted["speedup"])
    if naive and wanted.get("naive_valid_max") is not None:
        add(f"naive conversion valid < {wanted['naive_valid_max']:.0%} (the structural gap)",
            f"{naive['valid_rate']:.1%}", naive["valid_rate"] < wanted["naive_valid_max"])
    return out


def _dataset_name(data: dict) -> str:
    """The dataset the run prepared (its file stem, e.g. ``Beauty``), from the prepare stage's record."""
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


def write_report(run: str | Path, preset: str, config: dict[str, Any]) -> dict:
    """Write ``report.md``, ``report.json`` and the plots into the run directory ``run``, from its stage records
    (:func:`~diffgr2_trl.pipeline.stages.stage_record`); ``preset`` is the preset's name and ``config`` the resolved
    preset (its ``targets`` section sets the acceptance targets). Returns ``{"report": path of report.md}``."""
    run = Path(run)
    records = {name: stage_record(run, name) for name in STAGE_NAMES}
    evals = {stage: (records[stage] or {}).get("metrics") for _, stage in TABLE_ROWS}
    floor = next((e["prerank"] for e in evals.values() if e and e.get("prerank")), None)
    n = next((e["n"] for e in evals.values() if e and e.get("n")), None)
    decode_rows = ((records.get("decode") or {}).get("metrics") or {}).get("rows", [])
    data = (records.get("prepare") or {}).get("metrics") or {}

    cis = _confidence_intervals(run, [stage for _, stage in TABLE_ROWS])
    dataset = _dataset_name(data)
    lines = [f"# Diffusion-GR2 pipeline report: {dataset}, preset `{preset}` (`{run}`)", ""]
    if preset == "smoke":
        lines += ["**Smoke run: a plumbing check only.** Tiny models trained for seconds on a tiny slice; the numbers "
                  "below say the stages run end to end, nothing about the method.", ""]
    lines += _run_table(dataset, preset, config, data, n, decode_rows)
    lines += [f"Test rows evaluated: {n} (the same rows for every row of the table). Invalid outputs fall back to the "
              "pre-rank order for the ranking metrics and are counted in the validity columns.", "",
              "Glossary: *floor* = the pre-ranker's own order of the 10 candidates (what a re-ranker must beat); "
              "*R@k* = share of rows with the target in the top k; *N@k* = NDCG@k with one relevant item "
              "(1/log2(rank+2)); *valid* = share of outputs that parse as a permutation of the candidates; "
              "*ΔR@1 [95% CI]* = R@1 difference in points with its paired bootstrap interval (2,000 resamples).", ""]
    errs = sorted({k for e in evals.values() if e for k in (e["metrics"].get("errors") or {})}
                  | {k for e in evals.values() if e and e.get("constrained")
                     for k in (e["constrained"]["metrics"].get("errors") or {})})
    header = ["row", *METRICS, "valid", "ΔR@1 vs floor", "ΔR@1 vs AR teacher", *errs]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if floor:
        lines.append("| pre-rank order (floor) | " + " | ".join(_fmt(floor.get(k)) for k in METRICS) + " | - | - | - |"
                     + " - |" * len(errs))
    for label, stage in TABLE_ROWS:
        e = evals.get(stage)
        if not e:
            lines.append(f"| {label} | " + " | ".join("-" for _ in header[1:]) + " |")
            continue
        paired = [(label, e["metrics"], cis.get(stage) or {})]
        if e.get("constrained"):  # the constrained row goes right under the paper's (unconstrained) one
            paired.append((f"{label}, constrained", e["constrained"]["metrics"], cis.get(stage + CONSTRAINED) or {}))
        for row_label, m, ci in paired:
            err = m.get("errors") or {}
            lines.append(f"| {row_label} | " + " | ".join(_fmt(m.get(k)) for k in METRICS)
                         + f" | {_fmt(m.get('valid_rate'), 3)} | {_fmt_ci(ci.get('vs_floor'))} | "
                         + f"{_fmt_ci(ci.get('vs_teacher'))} | " + " | ".join(_fmt(err.get(k, 0)) for k in errs) + " |")
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
