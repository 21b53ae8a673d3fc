"""The evidence ranker (rerank/evidence.py) and its traces: label-free, learnable, and never contradicting the ranking."""

import random

import pytest

from diffgr2_trl.rerank.evidence import (
    FEATURES,
    AttributeRarity,
    EvidenceRanker,
    candidate_features,
    grouped_ranking,
    strongest_link,
)
from diffgr2_trl.rerank.metrics import copy_rate, ranking_agreement, summarize_ranks
from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.prompts import ItemText, build_prompt, parse_prompt
from diffgr2_trl.rerank.traces import evidence_completion, evidence_explanation, explanation_levels

COMMON = [f"<attr_{i}>" for i in range(3)]  # on most items
RARE = [f"<attr_{i}>" for i in range(10, 60)]  # a few items each


def _item(rng: random.Random, rare: str | None = None) -> ItemText:
    sid = "".join(f"<{lvl}_{rng.randrange(32)}>" for lvl in "abcd")
    attrs = [rng.choice(COMMON)] + ([rare] if rare else [rng.choice(RARE)] if rng.random() < 0.5 else [])
    return ItemText(sid, tuple(dict.fromkeys(attrs)))


def _rows(n: int, seed: int) -> list[tuple[list[ItemText], list[ItemText], int]]:
    """Synthetic lists in which the next purchase is, two times in three, the one candidate sharing a rare token
    with the last history item (anywhere in the list), else the pre-ranker's first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = [_item(rng) for _ in range(5)]
        link = rng.choice(RARE)
        history[-1] = ItemText(history[-1].sid, (COMMON[0], link))
        cands = [_item(rng) for _ in range(10)]
        cands = [c if link not in c.attrs else ItemText(c.sid, c.attrs[:1]) for c in cands]
        pos = rng.randrange(10)
        cands[pos] = _item(rng, rare=link)
        target = pos if rng.random() < 2 / 3 else 0
        rows.append((history, cands, target))
    return rows


def _rarity(rows) -> AttributeRarity:
    return AttributeRarity.from_items(i.attrs for h, c, _ in rows for i in [*h, *c])


def test_rarity_orders_tokens_by_how_few_items_carry_them():
    rarity = AttributeRarity.from_items([("<attr_1>", "<attr_2>"), ("<attr_1>",), ("<attr_1>",), ("<attr_3>",)])
    assert rarity.idf("<attr_1>") < rarity.idf("<attr_2>") == rarity.idf("<attr_3>")
    assert rarity.idf("<attr_99>") >= rarity.idf("<attr_2>")  # unseen: as rare as one item
    assert AttributeRarity.from_dict(rarity.to_dict()) == rarity
    with pytest.raises(ValueError, match="no items"):
        AttributeRarity.from_items([])


def test_features_and_links_come_from_the_prompt_items_alone():
    rows = _rows(20, 0)
    rarity = _rarity(rows)
    history, cands, target = rows[0]
    feats = candidate_features(history, cands, rarity)
    assert len(feats) == len(cands) and all(len(f) == len(FEATURES) for f in feats)
    linked = next(i for i, c in enumerate(cands) if set(c.attrs) & set(history[-1].attrs) - set(COMMON))
    # the rare link to the last item is the strongest last-item evidence of the list
    assert feats[linked][FEATURES.index("idf_last")] == max(f[FEATURES.index("idf_last")] for f in feats)
    token, ago = strongest_link(history, cands[linked], rarity)
    assert token in history[-1].attrs and token not in COMMON and ago == 0
    assert strongest_link([], cands[0], rarity) is None


def test_list_relative_features_rank_each_candidate_against_the_others():
    history, cands, _ = _rows(1, 3)[0]
    feats = candidate_features(history, cands, _rarity(_rows(20, 0)))
    recent = [f[FEATURES.index("idf_recent")] for f in feats]
    ranks = [f[FEATURES.index("recent_rank")] for f in feats]
    assert sorted(ranks) == list(range(len(cands)))
    assert all((recent[i] > recent[j]) <= (ranks[i] < ranks[j]) for i in range(10) for j in range(10))
    assert all(f[FEATURES.index("recent_gap")] == pytest.approx(max(recent) - r) for f, r in zip(feats, recent))


def test_features_do_not_depend_on_the_hash_seed():
    """Token sets iterate in an order PYTHONHASHSEED sets: ties and float sums must not follow it, or two runs of
    prepare write different levels for the same data."""
    import subprocess
    import sys

    # equally rare tokens on the last item and on several candidates: which one is "the" link is a tie; idf sums of
    # 3+ tokens in set order round differently
    code = ("from diffgr2_trl.rerank.evidence import AttributeRarity, candidate_features as f; "
            "from diffgr2_trl.rerank.prompts import ItemText as I; t = [f'<attr_{i}>' for i in range(8)]; "
            "r = AttributeRarity.from_items([t[:4], t[4:], [t[0]], [t[5]], [t[2], t[6]]]); "
            "h = [I('<a_1>', tuple(t[1:6])), I('<a_2>', tuple(t))]; "
            "c = [I(f'<a_{i}>', tuple(t[j] for j in range(8) if (i >> j) % 3)) for i in range(3, 40, 4)]; "
            "print(repr(f(h, c, r)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1


def test_grouped_ranking_keeps_pre_rank_order_inside_a_level():
    assert grouped_ranking(["a", "b", "c", "d", "e"], [0, 2, 0, 1, 2]) == ["b", "e", "d", "a", "c"]
    with pytest.raises(ValueError, match="levels"):
        grouped_ranking(["a"], [0, 1])


@pytest.fixture(scope="module")
def fitted():
    train = _rows(600, 1)
    rarity = _rarity(train)
    return EvidenceRanker(rarity, n_levels=3, max_iter=60, seed=0).fit(train, groups=list(range(600))), rarity


def test_ranker_learns_the_evidence_and_beats_the_pre_rank_order_on_held_out_lists(fitted):
    ranker, _ = fitted
    test = _rows(300, 2)
    ranks = [ranker.ranking(h, c).index(c[t].sid) for h, c, t in test]
    floor = summarize_ranks(t for _, _, t in test)
    got = summarize_ranks(ranks)
    assert got["R@1"] > floor["R@1"] + 0.2  # the linked candidate is the target 2/3 of the time
    assert len(ranker.thresholds) == 2 and ranker.thresholds == sorted(ranker.thresholds)
    # label-free: the ranking is a function of the prompt (any target gives the same ranking)
    h, c, _ = test[0]
    assert ranker.ranking(h, c) == ranker.ranking(*parse_prompt(build_prompt(h, c))[:2])


def test_cross_fitting_models_did_not_see_their_rows(fitted):
    ranker, _ = fitted
    h, c, _ = _rows(1, 3)[0]
    assert len(ranker._folds) == 2
    assert ranker.scores(h, c, fold=0) != ranker.scores(h, c, fold=1)  # two fits on disjoint halves


def test_ranker_refuses_bad_settings_and_round_trips(tmp_path, fitted):
    ranker, rarity = fitted
    with pytest.raises(ValueError, match="n_levels"):
        EvidenceRanker(rarity, n_levels=1).fit(_rows(10, 0))
    with pytest.raises(RuntimeError, match="fit"):
        EvidenceRanker(rarity).levels([], [])
    ranker.save(tmp_path / "r.pkl")
    h, c, _ = _rows(1, 4)[0]
    assert EvidenceRanker.load(tmp_path / "r.pkl").ranking(h, c) == ranker.ranking(h, c)
    # a ranker fitted on another feature set (an older version's pickle) is refused by name, not by scikit-learn
    import copy
    import pickle

    old = copy.copy(ranker)
    old.features = FEATURES[:12]
    (tmp_path / "old.pkl").write_bytes(pickle.dumps(old))
    with pytest.raises(ValueError, match="fitted on .* features.*Prepare the data again"):
        EvidenceRanker.load(tmp_path / "old.pkl")
    # a pickle from before the field: its classifier's width decides
    unnamed = copy.copy(ranker)
    del unnamed.features
    (tmp_path / "unnamed.pkl").write_bytes(pickle.dumps(unnamed))
    assert EvidenceRanker.load(tmp_path / "unnamed.pkl").ranking(h, c) == ranker.ranking(h, c)


def test_a_ranker_scoring_a_subset_reads_only_those_features(tmp_path):
    train = _rows(300, 5)
    rarity = _rarity(train)
    scored = ("position", "link_idf", "ago_linked")
    ranker = EvidenceRanker(rarity, n_levels=3, max_iter=30, seed=0, scored=scored).fit(train)
    assert ranker._model.n_features_in_ == 3
    h, c, _ = _rows(1, 6)[0]
    # an unscored feature (the candidate's own rarest token) changes; the candidates' scores do not
    padded = [ItemText(x.sid, (*x.attrs, "<attr_9999>")) for x in c]
    assert ranker.scores(h, padded) == ranker.scores(h, c)
    every = EvidenceRanker(rarity, n_levels=3, max_iter=30, seed=0).fit(train)
    assert every.scores(h, padded) != every.scores(h, c)  # with all features scored, it does
    ranker.save(tmp_path / "r.pkl")
    assert EvidenceRanker.load(tmp_path / "r.pkl").scores(h, c) == ranker.scores(h, c)
    with pytest.raises(ValueError, match="unknown feature"):
        EvidenceRanker(rarity, scored=("position", "no_such"))


@pytest.mark.parametrize("seed", range(5))
def test_the_explanation_never_contradicts_its_ranking(fitted, seed):
    ranker, rarity = fitted
    for h, c, _ in _rows(40, 100 + seed):
        completion, ranking = evidence_completion(h, c, ranker)
        parsed = parse_ranking(completion, [x.sid for x in c])
        assert parsed.valid and parsed.ranking == ranking
        levels = explanation_levels(parsed.explanation)
        assert list(levels) == [x.sid for x in c]  # every candidate, in pre-rank order
        assert grouped_ranking(list(levels), list(levels.values())) == ranking
        for x in c:  # the evidence it cites is in the prompt: the linked token is on the candidate and the history
            link = strongest_link(h, x, rarity)
            if link is not None:
                assert f"{x.sid} {link[0]}" in parsed.explanation


def test_evidence_explanation_refuses_mismatched_levels(fitted):
    _, rarity = fitted
    h, c, _ = _rows(1, 5)[0]
    with pytest.raises(ValueError, match="levels"):
        evidence_explanation(h, c, [0], rarity)


def test_copy_rate_and_agreement_against_hand_computed_values():
    cands = [["a", "b", "c"]] * 3
    assert copy_rate([["a", "b", "c"], None, ["b", "a", "c"]], cands) == 0.5
    assert copy_rate([None, None, None], cands) is None
    agree = ranking_agreement([["a", "b", "c"], ["c", "b", "a"], None], [["a", "c", "b"], ["a", "b", "c"], ["a", "b", "c"]])
    assert agree["n"] == 2 and agree["top1"] == 0.5 and agree["exact"] == 0.0
    assert agree["kendall_tau"] == pytest.approx((1 / 3 + -1) / 2)
    with pytest.raises(ValueError, match="same rows"):
        ranking_agreement([None], [])


def test_rarity_marks_survive_the_prompt_and_the_trace():
    """With ``prepare --rarity_marks`` an attribute token is ``<attr_N><rare_K>``: parsing the prompt gives back the
    same items (so the ranker sees what it was fitted on) and the trace's links, marks included, read back."""
    from diffgr2_trl.rerank.traces import explanation_links, link_text

    h, c, _ = _rows(1, 7)[0]

    def mark(items):
        return [ItemText(i.sid, tuple(f"{a}<rare_{int(a[6:-1]) % 3}>" for a in i.attrs)) for i in items]

    h, c = mark(h), mark(c)
    assert parse_prompt(build_prompt(h, c, max_history=None)) == (h, c)
    rarity = AttributeRarity.from_items(i.attrs for i in [*h, *c])
    levels = list(range(len(c)))[::-1]
    links = explanation_links(evidence_explanation(h, c, [lv % 5 for lv in levels], rarity))
    assert list(links) == [x.sid for x in c]
    assert [where for where, _ in links.values()] == [link_text(h, x, rarity) for x in c]
    assert any("<rare_" in where for where, _ in links.values())
    assert [lv for _, lv in links.values()] == [lv % 5 for lv in levels]
