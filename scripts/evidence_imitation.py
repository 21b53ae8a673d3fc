"""How well a trained model imitates the evidence traces on the test split: per-candidate accuracy of the links and
levels its explanations state (against what the evidence ranker's trace would state), how often its answer follows its
own stated levels, and the levels it states at each pre-rank position against the ranker's (does it read the evidence,
or learn a level per position?).

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
from diffgr2_trl.rerank.traces import explanation_links, link_text  # noqa: E402


def imitation(run: str, stage: str) -> dict:
    """``{"valid", "listed", "link_accuracy", "token_accuracy", "cited_in_history", "level_accuracy",
    "level_accuracy_where_link_right", "follows_own_levels", "confusion", "by_position"}`` of one evaluation stage's
    rows (module docstring); ``cited_in_history``: share of stated links whose token is one of the history's."""
    ranker = load_evidence_ranker(f"{run}/prepare/data")
    rows = load_split(f"{run}/prepare/data", "test").to_list()
    with open(f"{run}/{stage}/eval_outputs.json") as f:
        recs = json.load(f)
    lists = [parse_prompt(r["prompt"]) for r in rows[: len(recs)]]
    levels = [ranker.levels_of(s) for s in ranker.scores_many(lists)]
    confusion: collections.Counter = collections.Counter()
    by_position: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    links = collections.Counter()
    valid = listed = follows = 0
    for rec, row, (history, cands), want in zip(recs, rows, lists, levels):
        if not rec["valid"]:
            continue
        valid += 1
        got = explanation_links(parse_ranking(rec["completion"], row["candidates"]).explanation or "")
        if list(got) != list(row["candidates"]):  # the explanation does not list every candidate in pre-rank order
            continue
        listed += 1
        held = {t for item in history for t in item.attrs}
        for pos, (cand, level) in enumerate(zip(cands, want)):
            where, stated = got[cand.sid]
            truth = link_text(history, cand, ranker.rarity)
            links["n"] += 1
            links["link"] += where == truth
            links["token"] += where.split(" ")[0] == truth.split(" ")[0]
            links["cited"] += where.split(" ")[0] in held
            links["level_where_link_right"] += where == truth and stated == level
            by_position[pos][(level, stated)] += 1
        confusion.update(zip(want, (lv for _, lv in got.values())))
        follows += grouped_ranking(list(got), [lv for _, lv in got.values()]) == rec["ranking"]
    total = sum(confusion.values())

    def share(x: int, n: int) -> float | None:
        return x / n if n else None

    positions = {}
    for pos, c in sorted(by_position.items()):
        n = sum(c.values())
        positions[pos] = {"accuracy": share(sum(v for (a, b), v in c.items() if a == b), n),
                          "ranker_mean_level": sum(a * v for (a, _), v in c.items()) / n,
                          "stated_mean_level": sum(b * v for (_, b), v in c.items()) / n}
    return {"valid": valid, "listed": listed,
            "link_accuracy": share(links["link"], links["n"]), "token_accuracy": share(links["token"], links["n"]),
            "cited_in_history": share(links["cited"], links["n"]),
            "level_accuracy": share(sum(v for (a, b), v in confusion.items() if a == b), total),
            "level_accuracy_where_link_right": share(links["level_where_link_right"], links["link"]),
            "follows_own_levels": share(follows, listed),
            "confusion": {f"{a}->{b}": v for (a, b), v in sorted(confusion.items())},
            "by_position": positions}


if __name__ == "__main__":
    out = imitation(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "eval_ar")
    print(json.dumps(out, indent=1))
