"""Copy a prepared data directory, rewriting every completion's offline explanation with another citation style.

Used for the `cite_others_by` lever in results/copy_learning.md (same prompts, tokenizer and IDs, so a run on the copy
differs from a run on the original only in the explanations):

    python scripts/recite_explanations.py runs/prep/data runs/cite/data --cite_others_by position
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from datasets import Dataset, load_from_disk

from diffgr2_trl.rerank.prompts import RECOMMENDATIONS_OPEN, format_completion, parse_prompt, target_ranking
from diffgr2_trl.rerank.traces import offline_explanation


def completion(row: dict, cite: str) -> str:
    history, candidates = parse_prompt(row["prompt"])
    ranking = target_ranking([c.sid for c in candidates], row["target"])
    return format_completion(offline_explanation(history, candidates, ranking, cite_others_by=cite), ranking)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a `diffgr2 prepare` data directory")
    parser.add_argument("output", type=Path, help="where the copy goes (must not exist)")
    parser.add_argument("--cite_others_by", choices=["sid", "position"], default="position")
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; choose a new directory.")
    shutil.copytree(args.source, args.output, ignore=shutil.ignore_patterns("datasets"))
    (args.output / "datasets").mkdir()
    for split in ("train", "valid", "test"):
        rows = load_from_disk(str(args.source / "datasets" / split)).to_list()
        # The rewrite must reproduce the source when asked for its own style: prove it on the first rows.
        bad = [i for i, r in enumerate(rows[:50]) if completion(r, "sid") != r["completion"]]
        if bad:
            raise SystemExit(f"{split}: rows {bad[:5]} were not written by offline_explanation(cite_others_by='sid').")
        for r in rows:
            r["completion"] = completion(r, args.cite_others_by)
            r["answer_start"] = r["completion"].index(RECOMMENDATIONS_OPEN)
        Dataset.from_list(rows).save_to_disk(str(args.output / "datasets" / split))
        with open(args.output / "datasets" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
