"""Metrics, pre-rankers (vs popularity on a synthetic sequential task), candidates and prepare_data end to end."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from diffgr2_trl.rerank.candidates import build_examples, load_prepared, prepare_data
from diffgr2_trl.rerank.data import leave_one_out
from diffgr2_trl.rerank.metrics import ndcg_at_k, rank_of, recall_at_k, summarize_ranks
from diffgr2_trl.rerank.prerank import (
    PopularityPreRanker,
    SASRecConfig,
    SASRecPreRanker,
    TransitionPreRanker,
    evaluate_full_ranking,
    recommend,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_hand_computed():
    assert recall_at_k(0, 1) == 1.0 and recall_at_k(1, 1) == 0.0 and recall_at_k(None, 5) == 0.0
    assert recall_at_k(2, 3) == 1.0 and recall_at_k(3, 3) == 0.0
    assert ndcg_at_k(0, 3) == 1.0
    assert ndcg_at_k(1, 3) == pytest.approx(1 / math.log2(3))  # 0.6309
    assert ndcg_at_k(2, 3) == pytest.approx(0.5)
    assert ndcg_at_k(3, 3) == 0.0 and ndcg_at_k(None, 3) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(0, 0)
    assert rank_of(7, [3, 7, 9]) == 1 and rank_of(8, [3, 7, 9]) is None
    s = summarize_ranks([0, 1, 4, None])
    assert s["R@1"] == 0.25 and s["R@3"] == 0.5 and s["R@5"] == 0.75 and s["n"] == 4
    assert s["N@3"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert s["N@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert summarize_ranks([])["R@1"] == 0.0


def _synthetic(n_users=300, n_items=60, seed=0) -> dict[int, list[int]]:
    """Each item has a fixed successor (a random permutation); 85% of steps follow it, the rest jump at random.
    Popularity is flat by construction, so a sequential model must learn the transitions to win."""
    rng = random.Random(seed)
    succ = list(range(1, n_items + 1))
    rng.shuffle(succ)
    seqs = {}
    for u in range(1, n_users + 1):
        s = [rng.randint(1, n_items)]
        for _ in range(rng.randint(5, 12)):
            nxt = succ[s[-1] - 1] if rng.random() < 0.85 else rng.randint(1, n_items)
            s.append(nxt)
        seqs[u] = s
    return seqs




@pytest.fixture(scope="module")
def synthetic_split():
    return leave_one_out(_synthetic())


def _test_inputs(split):
    return [h for h, _ in split.test.values()], [t for _, t in split.test.values()]


def test_sequential_prerankers_beat_popularity(synthetic_split):
    hists, targets = _test_inputs(synthetic_split)
    pop = evaluate_full_ranking(PopularityPreRanker(60).fit(synthetic_split.train), hists, targets)
    trans = evaluate_full_ranking(TransitionPreRanker(60).fit(synthetic_split.train), hists, targets)
    cfg = SASRecConfig(hidden=32, epochs=15, batch_size=64, lr=5e-3, dropout=0.1)
    sas = evaluate_full_ranking(SASRecPreRanker(60, cfg, progress=False).fit(synthetic_split.train), hists, targets)
    assert pop["HR@10"] < 0.35
    assert trans["HR@10"] > pop["HR@10"] + 0.4 and trans["NDCG@10"] > pop["NDCG@10"] + 0.4
    assert sas["HR@10"] > pop["HR@10"] + 0.3


def test_sasrec_is_deterministic(synthetic_split):
    hists, _ = _test_inputs(synthetic_split)
    cfg = SASRecConfig(hidden=16, epochs=2, batch_size=64, seed=3)
    a = SASRecPreRanker(60, cfg, progress=False).fit(synthetic_split.train)
    b = SASRecPreRanker(60, cfg, progress=False).fit(synthetic_split.train)
    np.testing.assert_array_equal(recommend(a, hists[:50]), recommend(b, hists[:50]))


def test_recommend_excludes_history_and_breaks_ties_by_id():
    pop = PopularityPreRanker(12)
    pop.counts[:] = 1.0  # every item tied
    pop.counts[5] = 2.0
    recs = recommend(pop, [[5, 1], [2]], k=4)
    assert recs.tolist() == [[2, 3, 4, 6], [5, 1, 3, 4]]
    assert 0 not in recs


def test_build_examples_keeps_targets_in_candidates():
    cands = np.array([[4, 5, 6], [7, 8, 9]])
    ex, ranks = build_examples([1, 2], [[1, 2, 3], [1]], [5, 3], cands, history_len=2)
    assert ranks == [1, None]
    assert ex == [{"user_id": 1, "history": [2, 3], "candidates": [4, 5, 6], "target": 5}]


def test_prepare_data_end_to_end(tmp_path):
    seqs = _synthetic(n_users=120, n_items=40, seed=1)
    d = tmp_path / "data"
    d.mkdir()
    (d / "Toy.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in seqs.items()))
    (d / "Toy_item2attributes.json").write_text(json.dumps({str(i): [1 + i % 5, 6 + i % 3] for i in range(1, 41)}))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.txt").write_text("old run")  # replaced atomically, not merged
    cfg = SASRecConfig(hidden=16, epochs=1, batch_size=64)
    p = prepare_data(d, out, name="Toy", sasrec_config=cfg, codebook_size=4, history_len=3, progress=False)
    assert sorted(f.name for f in out.iterdir()) == [
        "prerank.json",
        "semantic_ids.json",
        "stats.json",
        "test.jsonl",
        "train.jsonl",
        "train_sequences.json",
        "valid.jsonl",
    ]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp dirs left behind
    assert p.prerank["chosen"] in ("transition", "sasrec")
    split = leave_one_out(seqs)
    for name in ("train", "valid", "test"):
        rows = p.examples[name]
        assert rows, name
        assert p.prerank["splits"][name]["examples"] == len(rows)
        for r in rows:
            assert set(r) == {"user_id", "history", "candidates", "target"}
            assert len(r["candidates"]) == 10 and r["target"] in r["candidates"] and len(r["history"]) <= 3
            assert not set(r["history"]) & set(r["candidates"])
            train = split.train[r["user_id"]]
            if name == "train":  # every prefix of the training items (all_prefixes), never a valid/test item
                assert any(train[i] == r["target"] and train[:i][-3:] == r["history"] for i in range(1, len(train)))
            elif name == "valid":
                assert r["target"] == seqs[r["user_id"]][-2] and r["history"] == train[-3:]
            else:
                assert r["target"] == seqs[r["user_id"]][-1] and r["history"] == seqs[r["user_id"]][:-1][-3:]
    floor = p.prerank["splits"]["test"]["floor"]
    ranks = [r["candidates"].index(r["target"]) for r in p.examples["test"]]
    assert floor["R@1"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks))
    loaded = load_prepared(out)
    assert loaded.examples == p.examples and loaded.stats == p.stats
    assert loaded.semantic_ids.encode(1) == p.semantic_ids.encode(1)
