"""Prompt layout, conversational form, prompt parsing and the canonical completion format."""

from __future__ import annotations

import pytest

from diffgr2_trl.rerank.parsing import is_canonical, parse_ranking
from diffgr2_trl.rerank.prompts import (
    SEPARATOR,
    ItemText,
    build_messages,
    build_prompt,
    build_rerank_row,
    format_completion,
    parse_prompt,
    target_ranking,
    to_items,
)

SID = {i: f"<a_{i % 7}><b_{i % 5}><c_{i}><d_0>" for i in range(40)}
ATTRS = {i: [f"<attr_{i % 3}>", f"<attr_{10 + i % 4}>"] for i in range(40)}
EXAMPLE = {"user_id": 1, "history": list(range(25)), "candidates": list(range(25, 35)), "target": 31}


def test_prompt_layout_orders_and_truncation():
    hist, cands = to_items(EXAMPLE["history"], SID, ATTRS), to_items(EXAMPLE["candidates"], SID.get, ATTRS.get)
    prompt = build_prompt(hist, cands, max_history=20)
    assert prompt.startswith("You are a re-ranking assistant for an online store.")
    assert SID[4] not in prompt and f"\n{SID[5]}<attr_2><attr_11>\n" in prompt  # last 20, oldest first
    positions = [prompt.index(SID[i]) for i in list(range(5, 25)) + list(range(25, 35))]
    assert positions == sorted(positions)  # history oldest first, then candidates in pre-rank order
    assert "all 10 candidate IDs" in prompt
    assert parse_prompt(prompt) == (hist[5:], cands)
    assert parse_prompt(build_prompt(hist, cands, max_history=0))[0] == []
    # the ID line: the candidates' IDs joined exactly as the answer joins them, right after the candidates
    ids = '\nIDs: ["' + '", "'.join(SID[i] for i in range(25, 35)) + '"]\n'
    assert ids in prompt and prompt.index(ids) > prompt.index(f"{SID[34]}<attr_1>")
    plain = build_prompt(hist, cands, max_history=20, id_line=False)
    assert "IDs:" not in plain and plain == prompt.replace(ids, "\n") and parse_prompt(plain) == parse_prompt(prompt)
    with pytest.raises(ValueError):
        parse_prompt("hello")


def test_conversational_form():
    hist, cands = to_items(EXAMPLE["history"], SID, ATTRS), to_items(EXAMPLE["candidates"], SID, ATTRS)
    messages = build_messages(hist, cands)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "online store" in messages[0]["content"] and SID[25] in messages[1]["content"]
    assert parse_prompt(messages) == parse_prompt(build_prompt(hist, cands))


@pytest.mark.parametrize("explanation", ["plain", 'quotes " and ", " inside', "new\nline \\ ünï ☃", ""])
def test_format_completion_is_what_the_parser_accepts(explanation):
    ranking = [SID[i] for i in range(34, 24, -1)]
    text = format_completion(explanation, ranking)
    # JSON escaping keeps the separator out of the explanation: 9 between IDs + 1 inside '", "recommendations": ["'.
    assert text.count(SEPARATOR) == 10
    result = parse_ranking(text, [SID[i] for i in range(25, 35)])
    assert result.valid and result.ranking == ranking and result.explanation == explanation
    assert is_canonical(text) and text.startswith('{"explanation": "') and text.endswith('"]}')


def test_target_ranking_and_rows():
    cands = [SID[i] for i in range(25, 35)]
    assert target_ranking(cands, SID[31]) == [SID[31]] + [c for c in cands if c != SID[31]]
    with pytest.raises(ValueError):
        target_ranking(cands, SID[0])
    row = build_rerank_row(EXAMPLE, SID, ATTRS)
    assert set(row) == {"prompt", "candidates", "target"} and row["candidates"] == cands and row["target"] == SID[31]
    seen = {}

    def explain(history, candidates, ranking):
        seen.update(n_hist=len(history), top=ranking[0])
        return "because"

    row = build_rerank_row(EXAMPLE, SID, ATTRS, conversational=True, explanation=explain, max_history=20)
    assert seen == {"n_hist": 20, "top": SID[31]}
    assert row["completion"] == [
        {"role": "assistant", "content": format_completion("because", target_ranking(cands, SID[31]))}
    ]
    assert isinstance(row["prompt"], list)
    assert ItemText("<a_1><b_1><c_1><d_1>").render() == "<a_1><b_1><c_1><d_1>"
