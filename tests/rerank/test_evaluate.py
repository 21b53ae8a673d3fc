"""Evaluation: hand-computed metrics with the pre-rank fallback for invalid outputs, a fake decoder, AR greedy decode."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffgr2_trl.rerank.evaluate import ar_greedy_decode, evaluate_model, score_outputs, write_json_atomic
from diffgr2_trl.rerank.parsing import ERRORS
from diffgr2_trl.rerank.prompts import format_completion

CANDS = [f"<a_{i}><b_0><c_0><d_0>" for i in range(10)]


def _row(target_pos: int) -> dict:
    return {"prompt": f"prompt {target_pos}", "candidates": CANDS, "target": CANDS[target_pos]}


def _valid(order: list[int]) -> str:
    return format_completion("why", [CANDS[i] for i in order])


# Example 0: target pre-ranked 3rd (pos 2), the model moves it first (valid).
# Example 1: target pre-ranked 1st, the model moves it to pos 4 (valid).
# Example 2: target pre-ranked 2nd, output drops a candidate (invalid) -> fallback: pos 1.
# Example 3: target pre-ranked 6th, output is garbage (invalid) -> fallback: pos 5.
ROWS = [_row(2), _row(0), _row(1), _row(5)]
TEXTS = [
    _valid([2, 0, 1, 3, 4, 5, 6, 7, 8, 9]),
    _valid([1, 2, 3, 4, 0, 5, 6, 7, 8, 9]),
    format_completion("x", CANDS[:9]),
    "not json",
]
RANKS = [0, 4, 1, 5]
PRE_RANKS = [2, 0, 1, 5]


def _expected(ranks: list[int]) -> dict[str, float]:
    n = len(ranks)

    def ndcg(r: int, k: int) -> float:
        return 1 / math.log2(r + 2) if r < k else 0.0

    return {
        "R@1": sum(r < 1 for r in ranks) / n,
        "R@3": sum(r < 3 for r in ranks) / n,
        "R@5": sum(r < 5 for r in ranks) / n,
        "N@3": sum(ndcg(r, 3) for r in ranks) / n,
        "N@5": sum(ndcg(r, 5) for r in ranks) / n,
    }


def test_score_outputs_hand_computed_with_fallback():
    out = score_outputs(TEXTS, [r["candidates"] for r in ROWS], [r["target"] for r in ROWS])
    m = out["metrics"]
    assert out["ranks"] == RANKS
    # By hand: ranks 0,4,1,5 -> R@1 1/4, R@3 2/4, R@5 3/4, N@3 (1 + 1/log2(3)) / 4, N@5 adds 1/log2(6).
    assert m["R@1"] == 0.25 and m["R@3"] == 0.5 and m["R@5"] == 0.75
    assert m["N@3"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["N@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    for k, v in _expected(RANKS).items():
        assert m[k] == pytest.approx(v)
    for k, v in _expected(PRE_RANKS).items():
        assert out["prerank"][k] == pytest.approx(v)
    assert m["valid_rate"] == 0.5
    assert m["errors"] == {e: {"dropped_candidate": 1, "unparseable": 1}.get(e, 0) for e in ERRORS}


def test_all_invalid_reproduces_the_floor():
    out = score_outputs(["{}"] * 4, [r["candidates"] for r in ROWS], [r["target"] for r in ROWS])
    assert {k: out["metrics"][k] for k in ("R@1", "R@3", "N@3")} == {k: out["prerank"][k] for k in ("R@1", "R@3", "N@3")}
    assert out["metrics"]["valid_rate"] == 0.0 and out["metrics"]["errors"]["unparseable"] == 4


def test_score_outputs_rejects_bad_input():
    with pytest.raises(ValueError, match="Lengths differ"):
        score_outputs(["a"], [CANDS, CANDS], [CANDS[0]])
    with pytest.raises(ValueError, match="not among"):
        score_outputs(["a"], [CANDS], ["<a_99><b_0><c_0><d_0>"])


def test_evaluate_model_with_fake_decoder_keeps_order_and_counts_tokens():
    by_prompt = {r["prompt"]: t for r, t in zip(ROWS, TEXTS)}
    calls = []

    def fake_decode(model, tokenizer, prompts, max_new_tokens):
        calls.append(list(prompts))
        return [by_prompt[p] for p in prompts], {"generated_tokens": 10 * len(prompts), "forward_passes": 5 * len(prompts)}

    out = evaluate_model(object(), None, ROWS, fake_decode, batch_size=3, progress=False, keep_outputs=True)
    assert [len(c) for c in calls] == [3, 1]
    assert out["outputs"] == TEXTS and out["ranks"] == RANKS and out["n"] == 4
    m = out["metrics"]
    assert m["R@1"] == 0.25 and m["valid_rate"] == 0.5
    assert m["generated_tokens"] == 40 and m["mean_completion_tokens"] == 10
    assert m["tokens_per_forward"] == 2.0 and m["tokens_per_s"] > 0


def test_ar_greedy_decode_batch_matches_single_rows(tiny_model, word_tokenizer):
    prompts = ["sort 3 1 2 :", "copy 5 :", "sort 9 8 7 6 5 4 :"]
    texts, stats = ar_greedy_decode(tiny_model, word_tokenizer, prompts, max_new_tokens=6)
    singles = [ar_greedy_decode(tiny_model, word_tokenizer, [p], max_new_tokens=6)[0][0] for p in prompts]
    assert texts == singles
    assert 0 < stats["generated_tokens"] <= 18 and stats["forward_passes"] == stats["generated_tokens"]
    assert word_tokenizer.padding_side == "right"  # restored


def test_compiled_ar_decoder_matches_eager(tiny_model, word_tokenizer):
    """The compiled AR baseline (static cache + torch.compile) decodes what eager ``generate`` decodes; ``eager``
    traces with dynamo without building kernels (inductor + CUDA graphs on a GPU)."""
    from diffgr2_trl.rerank.evaluate import DECODERS, make_ar_decode

    prompts = ["sort 3 1 2 :", "copy 7 :"]
    eager, _ = ar_greedy_decode(tiny_model, word_tokenizer, prompts, max_new_tokens=6)
    compiled = make_ar_decode(compile={"backend": "eager", "mode": None})
    assert compiled(tiny_model, word_tokenizer, prompts, 6)[0] == eager
    assert make_ar_decode(compile=False) is ar_greedy_decode and "ar_compiled" in DECODERS


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic({"a": torch.tensor(1).item()}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
