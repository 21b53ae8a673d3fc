"""How well a trained model imitates the evidence traces on the test split: per-candidate accuracy of the levels its
explanations state (against the evidence ranker's), and how often its answer follows its own stated levels.

    python scripts/evidence_imitation.py RUN [eval_ar]

Reads ``RUN/<stage>/eval_outputs.json`` (a pipeline evaluation stage) and ``RUN/prepare/data`` (a ``--targets evidence``
preparation). Results: ``results/evidence_traces.md``.
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffgr2_trl.rerank.evidence import grouped_ranking  # noqa: E402
from diffgr2_trl.rerank.parsing import parse_ranking  # noqa: E402
from diffgr2_trl.rerank.pipeline_data import load_evidence_ranker, load_split  # noqa: E402
from diffgr2_trl.rerank.prompts import parse_prompt  # noqa: E402
from diffgr2_trl.rerank.traces import explanation_levels  # noqa: E402


def imitation(run: str, stage: str) -> dict:
    """``{"valid", "listed", "level_accuracy", "follows_own_levels", "confusion"}`` of one evaluation stage's rows."""
    ranker = load_evidence_ranker(f"{run}/prepare/data")
    rows = load_split(f"{run}/prepare/data", "test").to_list()
    with open(f"{run}/{stage}/eval_outputs.json") as f:
        recs = json.load(f)
    lists = [parse_prompt(r["prompt"]) for r in rows]
    levels = [ranker.levels_of(s) for s in ranker.scores_many(lists)]
    confusion: collections.Counter = collections.Counter()
    valid = listed = follows = 0
    for rec, row, want in zip(recs, rows, levels, strict=True):
        if not rec["valid"]:
            continue
        valid += 1
        got = explanation_levels(parse_ranking(rec["completion"], row["candidates"]).explanation or "")
        if list(got) != list(row["candidates"]):  # the explanation does not list every candidate in pre-rank order
            continue
        listed += 1
        confusion.update(zip(want, got.values(), strict=True))
        follows += grouped_ranking(list(got), list(got.values())) == rec["ranking"]
    total = sum(confusion.values())
    return {"valid": valid, "listed": listed,
            "level_accuracy": sum(v for (a, b), v in confusion.items() if a == b) / total if total else None,
            "follows_own_levels": follows / listed if listed else None,
            "confusion": {f"{a}->{b}": v for (a, b), v in sorted(confusion.items())}}


if __name__ == "__main__":
    out = imitation(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "eval_ar")
    print(json.dumps(out, indent=1))
