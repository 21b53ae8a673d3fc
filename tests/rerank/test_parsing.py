"""Strict parser: every error label, its precedence, the accepted slack, and that it never raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgr2_trl.rerank.parsing import ERRORS, is_canonical, parse_ranking
from diffgr2_trl.rerank.prompts import format_completion

CANDS = [f"<a_{i}><b_{i + 1}><c_{i + 2}><d_{i + 3}>" for i in range(10)]


def _json(recs, explanation="why"):
    return json.dumps({"explanation": explanation, "recommendations": recs})


def test_valid_round_trip_with_slack():
    ranking = CANDS[::-1]
    text = format_completion('a "quoted"\nline, with ", " inside', ranking)
    for variant in [text, f"  \n{text}\n", text + "<eos>", text + "<|im_end|><eos> \n"]:
        result = parse_ranking(variant, CANDS)
        assert result.valid and result.ranking == ranking
        assert result.explanation == 'a "quoted"\nline, with ", " inside'


def test_conversational_completion_uses_last_assistant_message():
    text = format_completion("x", CANDS)
    messages = [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": text}]
    assert parse_ranking(messages, CANDS).valid
    parts = [
        {"role": "assistant", "content": [{"type": "text", "text": text[:20]}, {"type": "text", "text": text[20:]}]}
    ]
    assert parse_ranking(parts, CANDS).valid
    assert parse_ranking([{"role": "assistant", "content": None}], CANDS).error == "unparseable"


@pytest.mark.parametrize(
    "text, error",
    [
        ("not json", "unparseable"),
        (format_completion("x", CANDS)[:-2], "unparseable"),  # truncated
        (json.dumps({"recommendations": CANDS, "explanation": "x"}), "unparseable"),  # key order
        (json.dumps({"explanation": "x", "recommendations": CANDS, "extra": 1}), "unparseable"),
        ('{"explanation": "x", "explanation": "y", "recommendations": []}', "unparseable"),  # duplicate key
        (json.dumps([["explanation", "x"], ["recommendations", CANDS]]), "unparseable"),  # array, not object
        (json.dumps({"explanation": 3, "recommendations": CANDS}), "unparseable"),
        (json.dumps({"explanation": "x", "recommendations": {}}), "unparseable"),
        (json.dumps({"explanation": "x", "recommendations": [*CANDS[:9], 7]}), "unparseable"),
        (format_completion("x", CANDS) + " trailing", "unparseable"),
        (_json(CANDS[:9]), "dropped_candidate"),  # pure omission
        (_json([]), "dropped_candidate"),
        (_json(CANDS[:8] + [CANDS[0]]), "wrong_count"),  # short and duplicated
        (_json(CANDS + [CANDS[0]]), "wrong_count"),  # too long
        (_json(CANDS[:9] + ["<a_99><b_99><c_99><d_99>"]), "out_of_set_id"),
        (_json(CANDS[:9] + [CANDS[0] + " "]), "out_of_set_id"),  # entries are matched exactly
        (_json(CANDS[:9] + [CANDS[0]]), "duplicate_id"),
        (_json(CANDS[:8] + [CANDS[0], "<a_99><b_99><c_99><d_99>"]), "out_of_set_id"),  # out-of-set beats duplicate
    ],
)
def test_error_labels_and_precedence(text, error):
    result = parse_ranking(text, CANDS)
    assert result.error == error and result.ranking is None


def test_every_error_label_is_reachable():
    texts = ["", _json(CANDS[:9]), _json(CANDS + CANDS[:1]), _json(CANDS[:9] + ["zz"]), _json(CANDS[:9] + CANDS[:1])]
    assert {parse_ranking(t, CANDS).error for t in texts} == set(ERRORS)


@pytest.mark.parametrize("cands", [None, "abc", [], [1, 2], CANDS + CANDS[:1], 5])
def test_malformed_candidates_are_unparseable(cands):
    assert parse_ranking(format_completion("x", CANDS), cands).error == "unparseable"


def test_canonical_form_is_stricter_than_parsing():
    canonical = format_completion("x", CANDS)
    spaced = json.dumps({"explanation": "x", "recommendations": CANDS}, indent=2)
    assert is_canonical(canonical + "<eos>") and parse_ranking(spaced, CANDS).valid
    assert not is_canonical(spaced) and not is_canonical(42)


_junk = st.one_of(
    st.text(max_size=300),
    st.none(),
    st.integers(),
    st.lists(st.text(max_size=20), max_size=5),
    st.lists(
        st.dictionaries(st.sampled_from(["role", "content"]), st.one_of(st.text(max_size=50), st.none())), max_size=3
    ),
    st.builds(
        lambda k, r: _json(r)[: k or None],
        st.integers(0, 400),
        st.lists(st.sampled_from(CANDS + ["<a_1>", ""]), max_size=12),
    ),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=_junk)
def test_never_raises(text):
    result = parse_ranking(text, CANDS)
    assert result.error in ERRORS or (result.error is None and sorted(result.ranking) == sorted(CANDS))


def test_huge_and_deeply_nested_inputs():
    assert parse_ranking("[" * 100_000, CANDS).error == "unparseable"
    assert parse_ranking("x" * 5_000_000, CANDS).error == "unparseable"
    assert parse_ranking(_json(CANDS, "é" * 10_000), CANDS).valid


def test_an_internal_error_propagates_instead_of_counting_as_unparseable(monkeypatch):
    from diffgr2_trl.rerank import parsing

    def broken(*args, **kwargs):
        raise RuntimeError("bug in the parser")

    monkeypatch.setattr(parsing, "strip_eos", broken)
    with pytest.raises(RuntimeError, match="bug in the parser"):
        parse_ranking(_json(CANDS), CANDS)
    with pytest.raises(RuntimeError, match="bug in the parser"):
        parsing.is_canonical(_json(CANDS))
