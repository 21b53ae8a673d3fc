"""Re-ranking rewards: hand-computed values, TRL's calling convention, and property tests over adversarial inputs."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffgr2_trl.rerank import scoring
from diffgr2_trl.rerank.prompts import format_completion
from diffgr2_trl.rewards import rerank
from diffgr2_trl.rewards.rerank import (
    conditional_format,
    gr2_reward,
    make_conditional_format,
    make_gr2_reward,
    make_ndcg_at_k,
    make_rank_promotion,
    ndcg_at_3,
    ndcg_at_5,
    rank_promotion,
    recall_at_1,
    recall_at_3,
    validity,
)

CANDS = [f"<a_{i}><b_{i}><c_{i}><d_{i}>" for i in range(10)]


def _move(target, to):
    rest = [c for c in CANDS if c != target]
    return rest[:to] + [target] + rest[to:]


def _call(func, completions, target, cands=CANDS):
    n = len(completions)
    return func(prompts=["p"] * n, completions=completions, candidates=[cands] * n, target=[target] * n)


def test_rank_promotion_and_gr2_hand_values():
    target = CANDS[4]  # pre-rank position 4
    comps = [format_completion("x", _move(target, to)) for to in (0, 4, 9)] + ["garbage"]
    assert _call(rank_promotion, comps, target) == pytest.approx([0.4, 0.0, -0.5, -1.0])
    # Format bonus only when promoted: copying the input order (position kept) earns nothing.
    assert _call(conditional_format, comps, target) == pytest.approx([0.2, 0.0, 0.0, 0.0])
    assert _call(gr2_reward, comps, target) == pytest.approx([0.6, 0.0, -0.5, -1.0])


def test_format_bonus_when_target_already_first():
    target = CANDS[0]
    comps = [format_completion("x", CANDS), format_completion("x", _move(target, 3))]
    assert _call(gr2_reward, comps, target) == pytest.approx([0.2, -0.3 + 0.2])


def test_metrics_hand_values():
    target = CANDS[5]
    comps = [format_completion("x", _move(target, to)) for to in (0, 2, 4)] + ['{"explanation": "x"}']
    assert _call(ndcg_at_3, comps, target) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert _call(ndcg_at_5, comps, target) == pytest.approx([1.0, 0.5, 1 / math.log2(6), 0.0])
    assert _call(recall_at_1, comps, target) == [1.0, 0.0, 0.0, 0.0]
    assert _call(recall_at_3, comps, target) == [1.0, 1.0, 0.0, 0.0]
    assert _call(validity, comps, target) == [1.0, 1.0, 1.0, 0.0]


def test_factories_names_and_parameters():
    f = make_gr2_reward(alpha=0.5, invalid_penalty=-2.0)
    assert f.__name__ == "gr2_reward_a0.5_p-2" and f.__doc__
    assert gr2_reward.__name__ == "gr2_reward" and ndcg_at_3.__name__ == "ndcg_at_3"
    assert make_ndcg_at_k(7).__name__ == "ndcg_at_7" and make_rank_promotion(-0.5).__name__ == "rank_promotion_p-0.5"
    target = CANDS[2]
    comps = [format_completion("x", _move(target, 0)), "{"]
    assert _call(f, comps, target) == pytest.approx([0.2 + 0.5, -2.0])
    # Strict format: a whitespace variant is still a valid ranking but earns no format bonus.
    spaced = json.dumps({"explanation": "x", "recommendations": _move(target, 0)}, indent=1)
    assert _call(make_conditional_format(strict=True), [spaced, comps[0]], target) == pytest.approx([0.0, 0.2])
    assert _call(rerank.gr2_reward_strict, [spaced], target) == pytest.approx([0.2])


def test_conversational_completions_and_flat_candidate_columns():
    target = CANDS[3]
    text = format_completion("x", _move(target, 0))
    conv = [[{"role": "assistant", "content": text}]]
    assert gr2_reward(
        prompts=[[{"role": "user", "content": "p"}]], completions=conv, candidates=[CANDS], target=[target]
    ) == pytest.approx([0.5])
    # Datasets that store the candidates as one string (JSON list or concatenated SIDs) work too.
    for flat in (json.dumps(CANDS), " ".join(CANDS), "".join(CANDS)):
        assert gr2_reward(prompts=["p"], completions=[text], candidates=[flat], target=[target]) == pytest.approx(
            [0.5]
        )


def test_target_not_among_candidates_is_not_applicable():
    """The one ``None`` (TRL: not applicable): the pre-ranker missed the true item, so no rank can be scored."""
    for func in (gr2_reward, rank_promotion, conditional_format, ndcg_at_3, recall_at_1, validity):
        out = func(prompts=["p", "p"], completions=[format_completion("x", CANDS)] * 2,
                   candidates=[CANDS, CANDS], target=["<a_99><b_0><c_0><d_0>", CANDS[0]])
        assert out[0] is None and isinstance(out[1], float)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "need a 'candidates' dataset column"),
        ({"candidates": [CANDS]}, "need a 'target' dataset column"),
        ({"candidates": [None], "target": [CANDS[0]]}, r"candidates\[0\] must be a list of candidate SID strings"),
        ({"candidates": [[1, 2, 3]], "target": [1]}, r"candidates\[0\] holds int 1: .* not item ids"),
        ({"candidates": [[101, 102]], "target": ["<a_1>"]}, r"candidates\[0\] holds int 101"),
        ({"candidates": [7], "target": [CANDS[0]]}, r"candidates\[0\] must be a list .* got int 7"),
        ({"candidates": CANDS, "target": CANDS[0]}, "must hold one entry per completion"),  # not per-completion lists
        ({"candidates": [CANDS + CANDS[:1]], "target": [CANDS[0]]}, "more than once"),  # duplicated candidates
        ({"candidates": [], "target": []}, "one entry per completion"),
        ({"candidates": [[]], "target": [CANDS[0]]}, "holds no candidate"),
        ({"candidates": ["[<a_1>, oops"], "target": [CANDS[0]]}, "not a JSON list"),
        ({"candidates": ["no ids here"], "target": [CANDS[0]]}, "holds no candidate"),
        ({"candidates": [CANDS], "target": [3]}, r"target\[0\] must be the true item's SID string, got int 3"),
    ],
)
def test_unusable_columns_raise_naming_the_column(kwargs, match):
    """Integer or malformed columns are a dataset bug: a specific error naming the column and row, never None."""
    for func in (gr2_reward, rank_promotion, conditional_format, ndcg_at_3, recall_at_1, validity):
        with pytest.raises(rerank.RewardColumnError, match=match):
            func(prompts=["p"], completions=[format_completion("x", CANDS)], **kwargs)


def test_extra_trl_kwargs_and_non_list_completions():
    comp = format_completion("x", CANDS)
    out = gr2_reward(["p"], [comp], candidates=[CANDS], target=[CANDS[0]], trainer_state=object(), log_extra=print)
    assert out == pytest.approx([0.2])
    assert gr2_reward(None, None) == [] and gr2_reward(None, 5) == [] and gr2_reward(None, "abc") == []


FUNCS = [gr2_reward, rank_promotion, conditional_format, ndcg_at_3, ndcg_at_5, recall_at_1, recall_at_3, validity]
RANGES = {
    "gr2_reward": (-1.0, 0.9 + 0.2),
    "rank_promotion": (-1.0, 0.9),
    "conditional_format": (0.0, 0.2),
}

_sid = st.sampled_from(CANDS + ["<a_99><b_1><c_2><d_3>", "<a_1>", "", "\u00e9\u2603"])
_completion = st.one_of(
    st.text(max_size=200),
    st.builds(lambda e, r: format_completion(e, r), st.text(max_size=80), st.lists(_sid, max_size=12)),
    st.builds(
        lambda e, r, k: format_completion(e, r)[:k], st.text(max_size=20), st.permutations(CANDS), st.integers(0, 300)
    ),
    st.builds(lambda r: format_completion("x", r), st.permutations(CANDS)),
    st.builds(lambda r: [{"role": "assistant", "content": format_completion("y", r)}], st.permutations(CANDS)),
    st.none(),
    st.integers(),
    st.lists(st.integers(), max_size=3),
    st.just("{" * 5000),
)
_column_value = st.one_of(st.just(CANDS), st.none(), st.text(max_size=30), st.lists(_sid, max_size=11), st.integers())


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    completions=st.lists(_completion, min_size=1, max_size=6),
    cands=st.lists(_column_value, max_size=7),
    targets=st.lists(st.one_of(_sid, st.none(), st.integers()), max_size=7),
)
def test_rewards_score_or_name_the_bad_column(completions, cands, targets):
    """Any completions with any columns: a float per completion (None only where the target is a string outside
    the candidates), or RewardColumnError; never another exception, never a quiet None."""
    for func in FUNCS:
        try:
            out = func(prompts=None, completions=completions, candidates=cands, target=targets)
        except rerank.RewardColumnError:
            continue
        assert len(out) == len(completions)
        lo, hi = RANGES.get(func.__name__, (0.0, 1.0))
        for i, value in enumerate(out):
            if value is None:
                assert isinstance(targets[i], str) and targets[i] not in scoring._as_candidates(cands[i], i)
            else:
                assert isinstance(value, float) and lo - 1e-9 <= value <= hi + 1e-9


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(completions=st.lists(_completion, min_size=1, max_size=6), target=st.sampled_from(CANDS))
def test_malformed_completions_never_raise(completions, target):
    """With well-formed columns every completion, however broken, gets a number."""
    n = len(completions)
    for func in FUNCS:
        out = func(prompts=None, completions=completions, candidates=[CANDS] * n, target=[target] * n)
        lo, hi = RANGES.get(func.__name__, (0.0, 1.0))
        assert len(out) == n and all(isinstance(v, float) and lo - 1e-9 <= v <= hi + 1e-9 for v in out)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(ranking=st.permutations(CANDS), target=st.sampled_from(CANDS))
def test_valid_rankings_score_consistently(ranking, target):
    comp = [format_completion("e", ranking)]
    rank = _call(rank_promotion, comp, target)[0]
    assert rank == pytest.approx((CANDS.index(target) - ranking.index(target)) / 10)
    bonus = 0.2 if rank > 0 or target == CANDS[0] else 0.0
    assert _call(gr2_reward, comp, target)[0] == pytest.approx(rank + bonus)
    assert _call(validity, comp, target) == [1.0]
    # Duplicating any ID breaks validity and gets exactly the invalid penalty: no partial credit.
    broken = [format_completion("e", ranking[:-1] + ranking[:1])]
    assert _call(gr2_reward, broken, target) == [-1.0] and _call(ndcg_at_5, broken, target) == [0.0]
