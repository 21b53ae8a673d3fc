"""Where a re-ranker's copies go wrong: the SID level of each invalid output's first miscopied ID.

Reads ``diffgr2 evaluate --outputs`` files (AR or block decoder, unconstrained) and the prepared data they were
decoded on, and prints, per file: which levels of the first wrong ID differ from the candidate in that slot
(``c`` = only the third level, ``abc`` = the first three, ...), the slot it sits in, and the share of slots
miscopied by the candidate's true last level (``<d_0>`` is ~90% of items with the default rank last level)::

    python scripts/copy_errors.py --data_dir RUN/prepare/data RUN/eval_ar/eval_outputs.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from diffgr2_trl.rerank.candidates import read_jsonl
from diffgr2_trl.rerank.semantic_ids import SemanticIds

# the raw list, also when it is not a permutation (parse_ranking returns a ranking only for valid outputs)
_RECS = re.compile(r'"recommendations": \[(.*?)\]')
_TOKENS = re.compile(r"<(\w)_(\d+)>")


def copy_errors(rows: list[dict], outputs: list[dict], encode: Callable[[int], str]) -> dict:
    """Counts for one evaluation: first-wrong-ID levels and slots, and miscopy rates by true last level.

    ``encode`` maps an item id to its SID string (:meth:`SemanticIds.encode`)."""
    if len(outputs) > len(rows):
        raise SystemExit(f"{len(outputs)} outputs but only {len(rows)} rows in the split: wrong --split?")
    levels: Counter[str] = Counter()
    slots: Counter[int] = Counter()
    by_last = {"d_0": [0, 0], "d_>0": [0, 0]}  # [miscopied, slots]
    for row, out in zip(rows, outputs):
        if row.get("user_id") != out.get("user_id"):
            raise SystemExit(f"output for user {out.get('user_id')} sits beside row of user {row.get('user_id')}")
        match = _RECS.search(out["completion"])
        if not match:
            continue
        cands = [encode(c) for c in row["candidates"]]
        recs = re.findall(r'"([^"]*)"', match.group(1))
        first_wrong = None
        for slot, (got, want) in enumerate(zip(recs, cands)):
            key = "d_0" if want.endswith("<d_0>") else "d_>0"
            by_last[key][1] += 1
            if got != want:
                by_last[key][0] += 1
                if first_wrong is None:
                    first_wrong = (slot, got, want)
        if out.get("error") == "out_of_set_id" and first_wrong is not None:
            slot, got, want = first_wrong
            diff = "".join(w[0] for g, w in zip(_TOKENS.findall(got), _TOKENS.findall(want)) if g != w)
            levels[diff or "length"] += 1
            slots[slot] += 1
    return {"first_wrong_id_levels": dict(levels.most_common()), "first_wrong_id_slots": dict(sorted(slots.items())),
            "miscopied_by_true_last_level": by_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="diffgr2 evaluate --outputs JSON files")
    parser.add_argument("--data_dir", type=Path, required=True, help="the prepared data the outputs were decoded on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    sids = SemanticIds.load(args.data_dir / "semantic_ids.json")
    rows = read_jsonl(args.data_dir / f"{args.split}.jsonl")
    for path in args.outputs:
        print(path, json.dumps(copy_errors(rows, json.loads(path.read_text()), sids.encode)))


if __name__ == "__main__":
    main()
