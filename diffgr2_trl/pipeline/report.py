"""``RUN/report.md``, ``RUN/report.json`` and PNG plots from the stage records of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text

# (row label, stage whose eval holds it); the pre-rank floor comes from any eval's "prerank" entry.
TABLE_ROWS = [
    ("AR GR2 (teacher)", "eval_ar"),
    ("naive conversion", "eval_naive"),
    ("+ CFT", "eval_cft"),
    ("+ CFT + OPD", "eval_opd"),
    ("+ OPD -> RL", "eval_rl"),
]
METRICS = ["R@1", "R@3", "R@5", "N@3", "N@5"]
CURVES = {"ar_sft": "AR SFT", "ar_rl": "AR RL (DAPO)", "cft": "CFT", "opd": "OPD", "rl": "diffusion GRPO"}


def _record(run: Path, name: str) -> dict | None:
    p = run / name / "stage.json"
    return json.loads(p.read_text()) if p.exists() else None


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

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in pts:
        label = "AR" if r["method"] == "ar" else f"tau={r['tau']}"
        ax.scatter(r["tokens_per_s"], r["R@1"], s=30)
        ax.annotate(label, (r["tokens_per_s"], r["R@1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("R@1")
    ax.set_title("accuracy vs decode speed")
    fig.tight_layout()
    path = run / "accuracy_vs_speed.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _targets(evals: dict, floor: dict | None, decode_rows: list[dict]) -> list[dict]:
    """The recipe's acceptance targets, each with the measured value and the gap."""
    final = (evals.get("eval_rl") or {}).get("metrics")
    teacher = (evals.get("eval_ar") or {}).get("metrics")
    naive = (evals.get("eval_naive") or {}).get("metrics")
    out = []
    if final and teacher:
        ratio = final["R@1"] / teacher["R@1"] if teacher["R@1"] else float("nan")
        out.append({"target": "final R@1 >= 98% of the AR teacher's", "measured": f"{ratio:.1%}", "met": ratio >= 0.98})
    if final and floor:
        gap = final["R@1"] - floor["R@1"]
        out.append({"target": "final R@1 >= pre-rank floor + 1 point", "measured": f"{gap * 100:+.2f} points",
                    "met": gap >= 0.01})
    tau09 = next((r for r in decode_rows if r.get("tau") == 0.9), None)
    if tau09:
        out.append({"target": "valid >= 99.5% at tau=0.9", "measured": f"{(tau09.get('valid_rate') or 0):.1%}",
                    "met": (tau09.get("valid_rate") or 0) >= 0.995})
        sp = tau09.get("speedup_vs_ar") or 0.0
        out.append({"target": "decode speedup vs AR >= 2.4x at tau=0.9 (stretch 3.5x)", "measured": f"{sp:.2f}x",
                    "met": sp >= 2.4})
    if naive:
        out.append({"target": "naive conversion shows the structural gap (mostly invalid)",
                    "measured": f"{1 - naive['valid_rate']:.1%} invalid", "met": naive["valid_rate"] < 0.5})
    return out


def write_report(ctx) -> dict:
    """Write the report files into the run directory and return the ``report.json`` content."""
    run: Path = ctx.run
    from .runner import PIPELINE_STAGES

    records = {name: _record(run, name) for name, _ in PIPELINE_STAGES}
    evals = {stage: (records[stage] or {}).get("metrics") for _, stage in TABLE_ROWS}
    floor = next((e["prerank"] for e in evals.values() if e and e.get("prerank")), None)
    n = next((e["n"] for e in evals.values() if e and e.get("n")), None)
    decode_rows = ((records.get("decode") or {}).get("metrics") or {}).get("rows", [])
    data = (records.get("prepare") or {}).get("metrics") or {}

    lines = [f"# Diffusion-GR2 pipeline report: `{run}` (preset `{ctx.args.preset}`)", ""]
    lines += [f"Test examples evaluated: {n}. Invalid outputs fall back to the pre-rank order for the ranking metrics "
              "and are counted in the validity columns.", ""]
    errs = sorted({k for e in evals.values() if e for k in (e["metrics"].get("errors") or {})})
    header = ["row", *METRICS, "valid", *errs]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if floor:
        lines.append("| pre-rank order (floor) | " + " | ".join(_fmt(floor.get(k)) for k in METRICS) + " | - |"
                     + " - |" * len(errs))
    for label, stage in TABLE_ROWS:
        e = evals.get(stage)
        if not e:
            lines.append(f"| {label} | " + " | ".join("-" for _ in header[1:]) + " |")
            continue
        m = e["metrics"]
        err = m.get("errors") or {}
        lines.append(f"| {label} | " + " | ".join(_fmt(m.get(k)) for k in METRICS) + f" | {_fmt(m.get('valid_rate'), 3)} | "
                     + " | ".join(_fmt(err.get(k, 0)) for k in errs) + " |")
    if decode_rows:
        lines += ["", "## Accuracy vs speed (same test slice, measured side by side in one run)", "",
                  "| decoder | tokens/s | forward passes | tokens/forward | speedup vs AR | R@1 | valid | mean tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decode_rows:
            label = "AR (teacher, KV cache)" if r["method"] == "ar" else f"block diffusion tau={r['tau']}"
            lines.append(f"| {label} | {_fmt(r.get('tokens_per_s'), 1)} | {_fmt(r.get('forward_passes'))} | "
                         f"{_fmt(r.get('tokens_per_forward'), 2)} | {_fmt(r.get('speedup_vs_ar'), 2)}x | "
                         f"{_fmt(r.get('R@1'))} | {_fmt(r.get('valid_rate'), 3)} | {_fmt(r.get('mean_completion_tokens'), 1)} |")
    targets = _targets(evals, floor, decode_rows)
    if targets:
        lines += ["", "## Targets (issue: cpu preset)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in targets]
    plots = _plot_curves(run, records)
    speed_plot = _plot_speed(run, decode_rows)
    if plots or speed_plot:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in ([speed_plot] if speed_plot else []) + plots]
    wall = {k: round(v["wall_s"], 1) for k, v in records.items() if v}
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in wall.items()]
    if data:
        lines += ["", "## Data", "", "```json", json.dumps(data, indent=1, default=str)[:4000], "```"]
    report = {
        "stages": {k: (v or {}).get("metrics") for k, v in records.items() if v and k != "report"},
        "decode": decode_rows,
        "config": ctx.preset,
        "data": data,
        "wall_s": wall,
        "floor": floor,
        "targets": targets,
    }
    for stage in list(report["stages"]):
        if isinstance(report["stages"][stage], dict):
            report["stages"][stage] = {k: v for k, v in report["stages"][stage].items() if k != "log_history"}
    atomic_write_text(run / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(run / "report.json", json.dumps(report, indent=2, default=str))
    return {"report": str(run / "report.md")}
