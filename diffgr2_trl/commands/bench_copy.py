"""``diffgr2 bench-copy``: how fast a model shape learns to copy candidate IDs, as a curve, for one recipe.

    diffgr2 bench-copy --dataset_name runs/cpu/prepare/data --output_dir runs/copy/id-line \\
        [--shape mini] [--id_line] [--mix front=1] [--batch_size 32] [--learning_rate 3e-3] \\
        [--schedule cosine --max_steps 1300] [--eval_steps 100] [--eval_rerank_rows 64] [--threads 2] \\
        [--compare runs/copy/base/curve.json]

Trains on fresh SID mid-training lists every step (:mod:`diffgr2_trl.rerank.copying`) and, every ``--eval_steps``, scores
one fixed held-out set of ``front`` lists (teacher-forced exact answers, greedy-decode validity) and, with
``--eval_rerank_rows N``, the first N re-ranking rows of the prepared valid split the same way (``rerank_*``: what the
teacher must do; bare lists stop tracking it once re-ranking rows join the mix). Writes
``output_dir/curve.json`` after every point (an interrupted run keeps its curve) and ``output_dir/curve.png``
(held-out exact and valid against lists seen and training minutes; ``--compare`` overlays other runs' curves).
Time only on a quiet machine: the load average at the start is recorded, and a warning printed when it is high.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._args import parse_command


@dataclass
class BenchCopyArguments:
    """Arguments of ``diffgr2 bench-copy``.

    Parameters:
        dataset_name: a ``diffgr2 prepare`` output directory (semantic IDs, training sequences, tokenizer).
        output_dir: where ``curve.json`` and ``curve.png`` go.
        arch / shape: the model built from a config with the prepared tokenizer
            (:data:`diffgr2_trl.modeling.MODEL_SHAPES`).
        id_line / mix / mix_end / batch_size / learning_rate / beta1 / beta2 / weight_decay / clip / warmup_steps / schedule /
            min_lr_ratio / max_steps: the recipe (:class:`diffgr2_trl.rerank.copying.CopyRecipe`).
        eval_steps: steps between held-out evaluations.
        eval_lists: held-out ``front`` lists (the same lists for every recipe with the same seed).
        eval_rerank_rows: held-out re-ranking rows (the first rows of the prepared valid split; 0: none).
        n_candidates: candidates per list.
        max_minutes: stop after this much training time (evaluations excluded); 0: no limit.
        stop_at_exact: stop once held-out exact reaches this share; 0: never.
        compare: other runs' ``curve.json`` files to overlay in the PNG.
        label: this run's name in plots (default: the output directory's name).
        threads: torch intra-op CPU threads (0: torch's default).
    """

    dataset_name: str = field(metadata={"help": "diffgr2 prepare output directory."})
    output_dir: str = field(metadata={"help": "Output directory (curve.json, curve.png)."})
    arch: str = field(default="qwen3", metadata={"help": "Architecture of the config-built model."})
    shape: str = field(default="mini", metadata={"help": "Model shape (tiny, mini, small, base, ...)."})
    id_line: bool = field(default=False, metadata={"help": "End list prompts with the IDs as the answer writes them."})
    mix: str | None = field(default=None, metadata={"help": "Task weights, e.g. front=1 (None: the default mix)."})
    mix_end: str | None = field(
        default=None, metadata={"help": "Task weights at the last step: a linear curriculum from --mix (None: none)."})
    batch_size: int = field(default=32, metadata={"help": "Fresh lists per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)."})
    clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine."})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "Cosine floor, as a share of the peak."})
    max_steps: int = field(default=1300, metadata={"help": "Training steps (and the cosine horizon)."})
    eval_steps: int = field(default=100, metadata={"help": "Steps between held-out evaluations."})
    eval_lists: int = field(default=64, metadata={"help": "Held-out front lists."})
    eval_rerank_rows: int = field(default=0, metadata={"help": "Held-out re-ranking rows of the valid split (0: none)."})
    n_candidates: int = field(default=10, metadata={"help": "Candidates per list."})
    max_minutes: float = field(default=0.0, metadata={"help": "Stop after this many training minutes (0: no limit)."})
    stop_at_exact: float = field(default=0.0, metadata={"help": "Stop once held-out exact reaches this (0: never)."})
    compare: list[str] = field(default_factory=list, metadata={"help": "Other runs' curve.json to overlay."})
    label: str | None = field(default=None, metadata={"help": "Name in plots (None: the output directory's name)."})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed (model init, lists, held-out set)."})


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchCopyArguments]:
    return parse_command("bench-copy", (BenchCopyArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


def _check(args: BenchCopyArguments) -> None:
    from ..errors import UserError

    if not (Path(args.dataset_name) / "semantic_ids.json").is_file():
        raise UserError(f"--dataset_name {args.dataset_name}: no semantic_ids.json there; pass a `diffgr2 prepare` "
                        "output directory (e.g. runs/cpu/prepare/data).")
    for path in args.compare:
        if not Path(path).is_file():
            raise UserError(f"--compare {path}: no such file (a bench-copy curve.json).")
    for name in ("eval_steps", "eval_lists", "batch_size", "max_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.eval_rerank_rows < 0:
        raise UserError(f"--eval_rerank_rows must be >= 0, got {args.eval_rerank_rows}.")
    if args.eval_rerank_rows and not (Path(args.dataset_name) / "datasets" / "valid").is_dir():
        raise UserError(f"--eval_rerank_rows {args.eval_rerank_rows}: {args.dataset_name} has no prepared valid split "
                        "(datasets/valid); re-run `diffgr2 prepare` or pass --eval_rerank_rows 0.")


def plot_curves(curves: Mapping[str, list[dict]], path: str | os.PathLike) -> None:
    """Held-out exact (solid) and valid (dashed) against lists seen and training minutes, one colour per run; the
    re-ranking rows' exact (square markers) and valid (dotted) where a run scored them. The legend names each run
    once (its colour) and each line style once, below the plots, so many runs stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    styles = {"exact": ("-", "o", "front lists: exact"), "valid": ("--", None, "front lists: valid"),
              "rerank_exact": ("-", "s", "re-ranking rows: exact"), "rerank_valid": (":", None, "re-ranking rows: valid")}
    used: set[str] = set()
    for i, points in enumerate(curves.values()):
        for key, (line, marker, _) in styles.items():
            if not any(p.get(key) is not None for p in points):
                continue
            used.add(key)
            for ax, x in zip(axes, ("lists", "train_minutes")):
                ax.plot([p[x] for p in points], [p.get(key) for p in points], linestyle=line, marker=marker, ms=3,
                        color=f"C{i}", alpha=1.0 if key.endswith("exact") else 0.6)
    axes[0].set_xlabel("lists seen")
    axes[1].set_xlabel("training minutes")
    axes[0].set_ylabel("held-out share")
    for ax in axes:
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", lw=3) for i in range(len(curves))]
    handles += [Line2D([], [], color="black", linestyle=styles[k][0], marker=styles[k][1], ms=3)
                for k in styles if k in used]
    labels = [*curves, *(styles[k][2] for k in styles if k in used)]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: BenchCopyArguments) -> dict:
    """Train and measure; writes ``curve.json`` (after every point) and ``curve.png``; returns the result."""
    _check(args)
    import torch

    from ..errors import UserError
    from ..modeling import build_model
    from ..rerank.candidates import load_train_sequences
    from ..rerank.copying import (
        CopyRecipe,
        first_reaching,
        make_heldout,
        make_rerank_heldout,
        rerank_rows_for,
        train_copying,
    )
    from ..rerank.pipeline_data import load_tokenizer
    from ..rerank.semantic_ids import SemanticIds
    from ..utils import atomic_write_text, set_threads

    set_threads(args.threads)
    try:
        recipe = CopyRecipe(id_line=args.id_line, mix=args.mix, mix_end=args.mix_end, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, betas=(args.beta1, args.beta2),
                            weight_decay=args.weight_decay, clip=args.clip, warmup_steps=args.warmup_steps,
                            schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, max_steps=args.max_steps)
    except ValueError as e:
        raise UserError(f"bench-copy: {e}") from None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 0.75 * cores:
        print(f"bench-copy: warning: load average {load:.2f} on {cores} cores; timings beside another job are "
              "not comparable (run one job at a time).")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.dataset_name)
    sids = SemanticIds.load(Path(args.dataset_name) / "semantic_ids.json")
    sequences = load_train_sequences(args.dataset_name)
    model = build_model(args.arch, tokenizer=tokenizer, shape=args.shape, max_position_embeddings=1024,
                        seed=args.seed)
    heldout = make_heldout(sequences, sids, tokenizer, n=args.eval_lists, seed=args.seed, id_line=args.id_line,
                           n_candidates=args.n_candidates)
    rerank_heldout = (make_rerank_heldout(args.dataset_name, tokenizer, n=args.eval_rerank_rows)
                      if args.eval_rerank_rows else None)
    label = args.label or out.name
    result: dict[str, Any] = {
        "label": label, "dataset": str(args.dataset_name), "arch": args.arch, "shape": args.shape,
        "params": sum(p.numel() for p in model.parameters()), "recipe": asdict(recipe),
        "threads": torch.get_num_threads(), "load_average_at_start": round(load, 2), "seed": args.seed,
        "eval_lists": args.eval_lists, "eval_rerank_rows": args.eval_rerank_rows, "points": [],
    }

    def on_point(p: dict) -> None:
        result["points"].append(p)
        atomic_write_text(out / "curve.json", json.dumps(result, indent=1))
        loss = "-" if p["loss"] is None else f"{p['loss']:.3f}"
        print(f"step {p['step']:5d} | lists {p['lists']:6d} | {p['train_minutes']:6.2f} min | loss {loss} | exact "
              f"{p['exact']:.3f} valid {p['valid']:.3f} correct {p['correct']:.3f}"
              + ("" if "rerank_exact" not in p else
                 f" | re-ranking exact {p['rerank_exact']:.3f} valid {p['rerank_valid']:.3f}")
              + ("" if p["s_per_step"] is None else f" | {p['s_per_step']:.3f} s/step {p['tokens_per_s']:.0f} tok/s"),
              flush=True)

    print(f"bench-copy: {label}: {args.shape} ({result['params'] / 1e6:.2f}M parameters), {recipe.max_steps} steps of "
          f"{recipe.batch_size} fresh lists, a line every {args.eval_steps} steps ({args.eval_lists} held-out lists)",
          flush=True)
    # each evaluation prints a line: that is the progress report, a bar would interleave with it
    train_copying(model, tokenizer, sequences, sids, recipe, heldout, eval_steps=args.eval_steps, seed=args.seed,
                  n_candidates=args.n_candidates, max_minutes=args.max_minutes or None,
                  stop_at_exact=args.stop_at_exact or None, on_point=on_point, progress=False,
                  rerank_rows=rerank_rows_for(recipe, args.dataset_name), rerank_heldout=rerank_heldout)
    points = result["points"]
    scored = [k for k in ("exact", "valid", "rerank_exact", "rerank_valid") if k in points[-1]]
    result["reached"] = {f"{key}>={level}": first_reaching(points, key, level)
                         for key in scored for level in (0.5, 0.9, 0.95)}
    timed = [p for p in points if p["s_per_step"] is not None]
    result["s_per_step"] = sum(p["s_per_step"] for p in timed) / len(timed) if timed else None
    atomic_write_text(out / "curve.json", json.dumps(result, indent=1))
    curves = {label: points}
    for path in args.compare:
        other = json.loads(Path(path).read_text())
        curves[other.get("label", Path(path).parent.name)] = other["points"]
    plot_curves(curves, out / "curve.png")
    hit = result["reached"]["exact>=0.9"]
    rerank = ("" if rerank_heldout is None else f", re-ranking exact {points[-1]['rerank_exact']:.3f} valid "
              f"{points[-1]['rerank_valid']:.3f}")
    print(f"bench-copy: {label}: final exact {points[-1]['exact']:.3f} valid {points[-1]['valid']:.3f}{rerank}; 90% exact "
          + ("not reached" if hit is None else f"at {hit['lists']} lists, {hit['train_minutes']:.1f} min")
          + f" | {out / 'curve.json'}")
    return result
