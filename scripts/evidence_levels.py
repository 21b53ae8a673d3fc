"""The evidence ranker at several level counts: R@1 / R@3 against the floor and copy rate, on the valid and test splits.

    python scripts/evidence_levels.py --dataset_name RUN/prepare/data --levels 2 3 4

Fits :func:`diffgr2_trl.rerank.pipeline_data.fit_evidence_ranker` on the prepared train split (as ``prepare --targets
evidence`` does) for each level count and prints the grouped ranking (what the traces teach) and the continuous score's
ranking (the procedure's ceiling). Results: ``results/evidence_traces.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffgr2_trl.rerank.candidates import load_prepared  # noqa: E402
from diffgr2_trl.rerank.evidence import grouped_ranking  # noqa: E402
from diffgr2_trl.rerank.metrics import copy_rate, summarize_ranks  # noqa: E402
from diffgr2_trl.rerank.pipeline_data import fit_evidence_ranker  # noqa: E402
from diffgr2_trl.rerank.prompts import to_items  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_name", required=True, help="a diffgr2 prepare output directory")
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--max_history", type=int, default=10, help="history items the prompts show")
    args = ap.parse_args()
    prepared = load_prepared(args.dataset_name)
    sids = prepared.semantic_ids
    for k in args.levels:
        t0 = time.perf_counter()
        ranker = fit_evidence_ranker(prepared, args.max_history, k)
        print(f"levels {k}: fitted in {time.perf_counter() - t0:.1f} s, thresholds {ranker.thresholds}")
        for split in ("valid", "test"):
            rows = prepared.examples[split]
            lists = [(to_items(list(e["history"])[-args.max_history:], sids.encode, sids.attribute_tokens),
                      to_items(e["candidates"], sids.encode, sids.attribute_tokens)) for e in rows]
            floor = summarize_ranks(e["candidates"].index(e["target"]) for e in rows)
            scores = ranker.scores_many(lists)
            for name, rank in (("levels", lambda c, s, r=ranker: grouped_ranking(c, r.levels_of(s))),
                               ("score", lambda c, s: [c[i] for i in sorted(range(len(s)), key=lambda i: -s[i])])):
                rankings = [rank(list(e["candidates"]), s) for e, s in zip(rows, scores)]
                m = summarize_ranks(r.index(e["target"]) for r, e in zip(rankings, rows))
                print(f"  {split:5s} {name:6s}: R@1 {m['R@1']:.4f} ({(m['R@1'] - floor['R@1']) * 100:+.2f}) "
                      f"R@3 {m['R@3']:.4f} ({(m['R@3'] - floor['R@3']) * 100:+.2f}) "
                      f"copy {copy_rate(rankings, [e['candidates'] for e in rows]):.3f}")


if __name__ == "__main__":
    main()
