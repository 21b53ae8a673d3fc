"""The tau x sub-block map of a pipeline run's final student: accuracy on the whole split against speed, side by side.

    python scripts/decode_map.py RUN --out results/decode_map

For every cell (tau in ``--taus``, decode sub-block in ``--sub_blocks``) the student (``RUN/<--stage>/model``,
default the RL student) is decoded twice with ``diffgr2 evaluate``'s own code:

- **accuracy**: the whole split (``--limit``: the first N rows) at ``--accuracy_batch``, unconstrained (the paper's
  row): validity, R@1 / R@3 and their paired-bootstrap CIs against the floor, agreement with the AR teacher on the same
  rows (read from ``RUN/eval_ar/eval_outputs.json``: top-1, exact, Kendall tau over rows where both are valid) and
  tokens per forward. Sampler decoding is exact per row whatever the batch (tested), so these hold at every batch size.
- **speed**: the first ``--speed_rows`` rows at each of ``--speed_batches``, with the AR teacher decoding the same rows
  first in the same process; the speedup is tokens/s against AR at the same batch size.

Cells are saved as they finish (``map.json``) and skipped when rerun with the same settings, so an interrupted map
resumes. The result: ``map.json``, ``map.md`` (the tables and the default the rule below picks) and ``map.png`` (the
paper's accuracy-vs-speed curve, one panel per batch size). Time the speed phase on a quiet machine (one job, threads
pinned); the accuracy phase does not depend on load.

The default is picked by a stated rule: among the cells whose validity is within ``--validity_slack`` points of the
best cell's and whose R@1 is within ``--r1_slack`` points of the best cell's, the fastest at the largest speed batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _evaluate(model: str, data: str, out: Path, tag: str, **options) -> tuple[dict, list[dict]]:
    """One ``diffgr2 evaluate`` run (its ``run`` function); returns its result and its per-row records."""
    from diffgr2_trl.commands import evaluate as evaluate_command

    values = {"model_name_or_path": model, "dataset_name": data, "json": str(out / f"{tag}.json"),
              "outputs": str(out / f"{tag}_outputs.json"), **options}
    result = evaluate_command.run(*evaluate_command.parse(values=values))
    return result, json.loads((out / f"{tag}_outputs.json").read_text())


def _cell_key(tau: float, sub_block: int) -> str:
    return f"tau{tau}_sb{sub_block}"


def pick_default(cells: list[dict], speed_batch: int, validity_slack: float, r1_slack: float) -> dict | None:
    """The rule of the module docstring over the map's cells (``None`` when no cell has a speed at that batch)."""
    timed = [c for c in cells if c.get("speed", {}).get(str(speed_batch))]
    if not timed:
        return None
    best_valid = max(c["accuracy"]["valid_rate"] for c in timed)
    best_r1 = max(c["accuracy"]["R@1"] for c in timed)
    fair = [c for c in timed if c["accuracy"]["valid_rate"] >= best_valid - validity_slack / 100
            and c["accuracy"]["R@1"] >= best_r1 - r1_slack / 100]
    return max(fair, key=lambda c: c["speed"][str(speed_batch)]["speedup_vs_ar"])


def _plot(path: Path, cells: list[dict], batches: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for sb in sorted({c["sub_block"] for c in cells}):
            pts = sorted((c for c in cells if c["sub_block"] == sb and str(b) in c.get("speed", {})),
                         key=lambda c: c["tau"])
            if not pts:
                continue
            xs = [c["speed"][str(b)]["speedup_vs_ar"] for c in pts]
            ax.plot(xs, [c["accuracy"]["R@1"] for c in pts], "o-", label=f"sub-block {sb}: R@1")
            ax.plot(xs, [c["accuracy"]["valid_rate"] for c in pts], "s--", alpha=0.5, label=f"sub-block {sb}: valid")
            for c, x in zip(pts, xs):
                ax.annotate(f"{c['tau']}", (x, c["accuracy"]["R@1"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel(f"speedup vs AR, batch {b}")
        ax.set_ylabel("share of rows")
        ax.set_title(f"batch {b} (labels: tau)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def _markdown(cells: list[dict], meta: dict, default: dict | None) -> str:
    def share(x: float) -> str:
        return "-" if x != x else f"{x:.3f}"  # nan: no row where both rankings are valid

    def pct(ci: dict) -> str:
        return f"{ci['diff'] * 100:+.1f} [{ci['lo'] * 100:+.1f}, {ci['hi'] * 100:+.1f}]"

    batches = meta["speed_batches"]
    head = ["tau", "sub-block", "valid", "R@1", "R@3", "ΔR@1 vs floor", "ΔR@3 vs floor", "top-1 agr.", "exact agr.",
            "Kendall τ", "tokens/forward", *(f"speedup b{b}" for b in batches), "decode s (accuracy)"]
    lines = [f"# tau x sub-block map: `{meta['model']}`", "",
             f"Accuracy: {meta['rows']:,} rows of the {meta['split']} split at batch {meta['accuracy_batch']}, "
             f"unconstrained; agreement with the AR teacher over rows where both are valid. Speed: the first "
             f"{meta['speed_rows']} rows, AR on the same rows in the same process, {meta['threads']} threads, load "
             f"average {meta['load_average']:.2f} at the start. Command: `{meta['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        a, g = c["accuracy"], c["agreement"]
        speeds = [f"{c['speed'][str(b)]['speedup_vs_ar']:.2f}x" if str(b) in c.get("speed", {}) else "-"
                  for b in batches]
        lines.append(f"| {c['tau']} | {c['sub_block']} | {a['valid_rate']:.3f} | {a['R@1']:.4f} | {a['R@3']:.4f} | "
                     f"{pct(c['vs_floor']['R@1'])} | {pct(c['vs_floor']['R@3'])} | {share(g['top1'])} | "
                     f"{share(g['exact'])} | {share(g['kendall_tau'])} | {a['tokens_per_forward']:.2f} | "
                     + " | ".join(speeds) + f" | {a['decode_seconds']:.0f} |")
    lines += ["", "AR teacher speed on the speed rows: "
              + ", ".join(f"batch {b}: {meta['ar_tokens_per_s'][str(b)]:.1f} tokens/s" for b in batches
                          if str(b) in meta.get("ar_tokens_per_s", {})), ""]
    if default is not None:
        lines += [f"Default by the rule (validity within {meta['validity_slack']} points of the best cell, R@1 within "
                  f"{meta['r1_slack']} points of the best, then the fastest at batch {batches[-1]}): **tau "
                  f"{default['tau']}, sub-block {default['sub_block']}**.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a `diffgr2 pipeline` run directory with the student, ar_rl and eval_ar stages done")
    p.add_argument("--stage", default="rl", help="the student's stage (its model is RUN/<stage>/model)")
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    p.add_argument("--sub_blocks", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None,
                   help="accuracy on the first N rows only (default: the rows RUN/eval_ar evaluated)")
    p.add_argument("--accuracy_batch", type=int, default=64)
    p.add_argument("--speed_rows", type=int, default=32)
    p.add_argument("--speed_batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--max_completion_length", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--validity_slack", type=float, default=1.0, help="points")
    p.add_argument("--r1_slack", type=float, default=0.5, help="points")
    p.add_argument("--skip_speed", action="store_true", help="the accuracy phase only")
    p.add_argument("--out", required=True, help="output directory (map.json, map.md, map.png, per-run files)")
    args = p.parse_args()

    from diffgr2_trl.rerank.metrics import paired_bootstrap_ci, ranking_agreement
    from diffgr2_trl.utils import atomic_write_text, set_threads, write_json_atomic

    run, out = Path(args.run), Path(args.out)
    model, teacher = run / args.stage / "model", run / "ar_rl" / "model"
    data = run / "prepare" / "data"
    for need in (model, teacher, run / "eval_ar" / "eval_outputs.json", data):
        if not need.exists():
            sys.exit(f"decode_map: {need} is missing; run the pipeline's {args.stage}, ar_rl and eval_ar stages first.")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    teacher_recs = json.loads((run / "eval_ar" / "eval_outputs.json").read_text())
    if args.limit is None:
        args.limit = len(teacher_recs)
    # what the accuracy cells depend on (threads and speed settings do not change a decode's tokens)
    settings = {k: getattr(args, k) for k in ("stage", "split", "limit", "accuracy_batch", "max_completion_length")}
    state_path = out / "map.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if any(state.get("settings", {}).get(k) != v for k, v in settings.items()):
        state = {"settings": settings, "cells": {}, "ar_tokens_per_s": {}}
    common = {"split": args.split, "max_completion_length": args.max_completion_length, "threads": args.threads}
    load = os.getloadavg()[0]

    def save() -> None:
        write_json_atomic(state, state_path)

    for tau in args.taus:  # accuracy: every row, one batch size
        for sb in args.sub_blocks:
            key = _cell_key(tau, sb)
            if key in state["cells"]:
                continue
            t0 = time.perf_counter()
            res, recs = _evaluate(str(model), str(data), out / "runs", key, decoder="block", tau=tau, block_size=sb,
                                  batch_size=args.accuracy_batch, limit=args.limit, **common)
            teach = teacher_recs[: len(recs)]
            if [r["user_id"] for r in teach] != [r["user_id"] for r in recs]:
                sys.exit("decode_map: RUN/eval_ar/eval_outputs.json holds other rows than this split's first rows.")
            ranks, floor = [r["rank"] for r in recs], [r["prerank_rank"] for r in recs]
            m = res["metrics"]
            state["cells"][key] = {
                "tau": tau, "sub_block": sb, "n": res["n"],
                "accuracy": {k: m.get(k) for k in ("valid_rate", "R@1", "R@3", "tokens_per_forward",
                                                   "mean_completion_tokens", "decode_seconds")},
                "vs_floor": {k: paired_bootstrap_ci(ranks, floor, metric=k) for k in ("R@1", "R@3")},
                "agreement": ranking_agreement([r["ranking"] for r in recs], [r["ranking"] for r in teach]),
                "speed": {},
            }
            save()
            print(f"map: {key}: valid {m['valid_rate']:.3f} R@1 {m['R@1']:.4f} R@3 {m['R@3']:.4f} "
                  f"{m.get('tokens_per_forward', 0):.2f} tok/fwd ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.skip_speed:
        # warm-up: the accuracy phase warmed the block sampler; AR's first generate call pays its own start-up
        _evaluate(str(teacher), str(data), out / "runs", "warmup_ar", decoder="ar", limit=2, batch_size=1, **common)
        for b in args.speed_batches:  # speed: the first rows, AR first, then every cell, in one process
            speed = {"limit": args.speed_rows, "batch_size": b, **common}
            ar, _ = _evaluate(str(teacher), str(data), out / "runs", f"speed_ar_b{b}", decoder="ar", **speed)
            state["ar_tokens_per_s"][str(b)] = ar["metrics"]["tokens_per_s"]
            for tau in args.taus:
                for sb in args.sub_blocks:
                    key = _cell_key(tau, sb)
                    res, _ = _evaluate(str(model), str(data), out / "runs", f"speed_{key}_b{b}", decoder="block",
                                       tau=tau, block_size=sb, **speed)
                    m = res["metrics"]
                    state["cells"][key]["speed"][str(b)] = {
                        "tokens_per_s": m["tokens_per_s"], "speedup_vs_ar": m["tokens_per_s"] / ar["metrics"]["tokens_per_s"],
                        "tokens_per_forward": m.get("tokens_per_forward"),
                    }
                    print(f"map: speed {key} batch {b}: {state['cells'][key]['speed'][str(b)]['speedup_vs_ar']:.2f}x AR",
                          flush=True)
            save()
    cells = [state["cells"][_cell_key(t, s)] for t in args.taus for s in args.sub_blocks]
    default = pick_default(cells, args.speed_batches[-1], args.validity_slack, args.r1_slack)
    meta = {"model": str(model), "rows": cells[0]["n"], "split": args.split, "accuracy_batch": args.accuracy_batch,
            "speed_rows": args.speed_rows, "speed_batches": args.speed_batches, "threads": args.threads,
            "load_average": load, "ar_tokens_per_s": state["ar_tokens_per_s"], "validity_slack": args.validity_slack,
            "r1_slack": args.r1_slack, "command": "python scripts/decode_map.py " + " ".join(sys.argv[1:])}
    state["default"] = None if default is None else {"tau": default["tau"], "sub_block": default["sub_block"]}
    state["meta"] = meta
    save()
    atomic_write_text(out / "map.md", _markdown(cells, meta, default))
    if not args.skip_speed:
        _plot(out / "map.png", cells, args.speed_batches)
    print(f"map: wrote {out / 'map.md'}" + (f"; default tau {default['tau']}, sub-block {default['sub_block']}"
                                            if default else ""))


if __name__ == "__main__":
    main()
