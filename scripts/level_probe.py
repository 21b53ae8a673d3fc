"""Does an AR teacher trained on evidence traces know the levels its greedy decoding does not state?

Teacher-forces the procedure's own trace (the prepared split's ``completion``) after each prompt and reads the
model's distribution over the level digit at every candidate's level slot (`` L`` then a digit, as
``rerank.traces`` writes them). The links and earlier levels in context are the trace's, which favours the model.

- ``separation``: per group of pre-rank positions, how well P(level > 0) separates the candidates the procedure lifts
  (level > 0) from the rest (ROC AUC), the mean P(level > 0) in each class, and how many lifts the argmax states.
- ``bias``: the grouped ranking (``evidence.grouped_ranking``) of levels decoded as argmax(log p(level) + b * level),
  for several b, with R@1 / R@3 against the floor (b = 0) and against the procedure's own levels.

    python scripts/level_probe.py RUN [--stage ar_rl] [--split valid] [--rows 800]

``RUN`` is a pipeline run directory with ``prepare --targets evidence`` data. Results: ``results/evidence_traces.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffgr2_trl.rerank.evidence import grouped_ranking  # noqa: E402
from diffgr2_trl.rerank.pipeline_data import load_split  # noqa: E402

GROUPS = {"positions 0-1": range(0, 2), "positions 2-3": range(2, 4), "positions 4-9": range(4, 10)}
BIASES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def level_log_probs(model, tok, rows) -> list[tuple[list[list[float]], list[int]]]:
    """Per row: the log-probabilities of levels 0..4 at each level slot, and the trace's levels."""
    opener = tok(" L", add_special_tokens=False)["input_ids"][-1]
    digits = [tok(f"L{lv}", add_special_tokens=False)["input_ids"][-1] for lv in range(5)]
    if len(set(digits)) != 5:
        raise ValueError("level_probe: the tokenizer does not give each level digit its own token.")
    out = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]
        slots = [len(p) + i + 1 for i in range(len(c) - 1) if c[i] == opener and c[i + 1] in digits]
        slots = slots[: len(r["candidates"])]
        if len(slots) != len(r["candidates"]):
            raise ValueError("level_probe: a completion without a level per candidate; is this evidence-trace data?")
        ids = p + c
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        out.append(([logits[s - 1][digits].log_softmax(-1).tolist() for s in slots],
                    [digits.index(ids[s]) for s in slots]))
    return out


def separation(probes) -> dict:
    from sklearn.metrics import roc_auc_score

    res = {}
    for name, positions in GROUPS.items():
        lift, p_lift, argmax_right = [], [], 0
        for lps, levels in probes:
            for pos in positions:
                if pos >= len(levels):
                    continue
                q = [torch.tensor(x).exp().item() for x in lps[pos]]
                lift.append(levels[pos] > 0)
                p_lift.append(1.0 - q[0])
                argmax_right += levels[pos] > 0 and max(range(5), key=q.__getitem__) > 0
        n_lift = sum(lift)
        res[name] = {
            "slots": len(lift), "lifted": n_lift,
            "auc": roc_auc_score(lift, p_lift) if 0 < n_lift < len(lift) else None,
            "mean_p_lift_where_lifted": sum(p for p, y in zip(p_lift, lift) if y) / max(1, n_lift),
            "mean_p_lift_elsewhere": sum(p for p, y in zip(p_lift, lift) if not y) / max(1, len(lift) - n_lift),
            "argmax_states_the_lift": argmax_right,
        }
    return res


def bias_sweep(probes, rows) -> dict:
    def recall(levels_of) -> dict:
        r1 = r3 = 0
        for (lps, levels), r in zip(probes, rows):
            ranking = grouped_ranking(r["candidates"], levels_of(lps, levels))
            r1 += ranking[0] == r["target"]
            r3 += r["target"] in ranking[:3]
        return {"R@1": r1 / len(rows), "R@3": r3 / len(rows)}

    res = {"floor": recall(lambda lps, levels: [0] * len(levels)), "procedure": recall(lambda lps, levels: levels)}
    for b in BIASES:
        res[f"bias {b}"] = recall(lambda lps, levels, b=b: [max(range(5), key=lambda lv: q[lv] + b * lv) for q in lps])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--stage", default="ar_rl", help="the pipeline stage whose model/ is probed")
    ap.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    ap.add_argument("--rows", type=int, default=800, help="first N rows of the split")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = os.path.join(args.run, args.stage, "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    data = load_split(os.path.join(args.run, "prepare", "data"), args.split)
    rows = data.select(range(min(args.rows, len(data)))).to_list()
    probes = level_log_probs(model, tok, rows)
    print(json.dumps({"rows": len(rows), "split": args.split, "separation": separation(probes),
                      "bias": bias_sweep(probes, rows)}, indent=1))


if __name__ == "__main__":
    main()
