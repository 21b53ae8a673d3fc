"""Decoding in child processes (``evaluate --workers``) and the AR constrained pass that reuses valid rows."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffgr2_trl.block_diffusion import BlockDecodingConfig
from diffgr2_trl.commands.evaluate import _reused
from diffgr2_trl.errors import UserError
from diffgr2_trl.rerank.evaluate import ar_greedy_decode, evaluate_model
from diffgr2_trl.rerank.prompts import format_completion
from diffgr2_trl.rerank.workers import DecodePool

CANDS = [f"<a_{i}><b_0><c_0><d_0>" for i in range(10)]


def test_children_decode_the_same_batches_as_this_process_and_raise_their_errors(teacher_model_dir):
    tok = AutoTokenizer.from_pretrained(teacher_model_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_model_dir).eval()
    words = ["sort", "copy", "think", "answer", "3", "7", "12", "20"]
    rows = [{"prompt": " ".join(words[i % 8: i % 8 + 1 + i % 5]), "candidates": CANDS, "target": CANDS[i % 10]}
            for i in range(10)]
    here = evaluate_model(model, tok, rows, ar_greedy_decode, batch_size=3, max_new_tokens=6, progress=False,
                          keep_outputs=True)
    with DecodePool(teacher_model_dir, "ar", BlockDecodingConfig(), processes=1) as pool:
        children = evaluate_model(None, tok, rows, None, batch_size=3, max_new_tokens=6, progress=False,
                                  keep_outputs=True, pool=pool)
        assert children["outputs"] == here["outputs"]
        assert children["metrics"]["generated_tokens"] == here["metrics"]["generated_tokens"]
        # beside this process (4 batches for one child: it starts): the same texts again
        mixed = evaluate_model(model, tok, rows, ar_greedy_decode, batch_size=3, max_new_tokens=6, progress=False,
                               keep_outputs=True, pool=pool)
        assert mixed["outputs"] == here["outputs"]
        # a child's error reaches the caller: an empty candidate list cannot be constrained
        with pytest.raises(ValueError, match="at least one candidate"):
            list(pool.decode([(["sort 3"], [[]])], 6))


def test_reused_rows_are_those_the_constraint_writes_unchanged(tmp_path):
    from diffgr2_trl.rerank.tokenizer import attr_tokens, sid_level_tokens, train_rerank_tokenizer

    valid = format_completion("why", CANDS[::-1])
    tok = train_rerank_tokenizer([valid, format_completion("because", CANDS)], sid_level_tokens(16), attr_tokens(4),
                                 vocab_size=300)
    eos = tok.eos_token
    rows = [{"user_id": u, "prompt": "p", "candidates": CANDS, "target": CANDS[0]} for u in range(5)]
    records = [
        {"user_id": 0, "completion": valid + eos, "valid": True},  # closed by EOS: reused
        {"user_id": 1, "completion": valid, "valid": True},  # no stop token (cut at the cap): decoded again
        {"user_id": 2, "completion": "garbage", "valid": False},
        {"user_id": 3, "completion": valid + eos, "valid": True},
        {"user_id": 4, "completion": valid + eos, "valid": True},
    ]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(records))
    stop = {tok.eos_token_id}
    assert _reused(str(path), rows, tok, 256, stop) == {0: valid + eos, 3: valid + eos, 4: valid + eos}
    # a completion longer than this pass's cap is decoded again
    n = len(tok(valid + eos, add_special_tokens=False)["input_ids"])
    assert _reused(str(path), rows, tok, n, stop).keys() == {0, 3, 4}
    assert _reused(str(path), rows, tok, n - 1, stop) == {}
    # another pass's rows are refused, by record and reason
    with pytest.raises(UserError, match="5 records for the 4 rows"):
        _reused(str(path), rows[:4], tok, 256, stop)
    path.write_text(json.dumps([{**records[0], "user_id": 9}, *records[1:]]))
    with pytest.raises(UserError, match="record 0 is user 9"):
        _reused(str(path), rows, tok, 256, stop)
    path.write_text(json.dumps([{**records[0], "completion": "not a ranking"}, *records[1:]]))
    with pytest.raises(UserError, match="record 0 is marked valid"):
        _reused(str(path), rows, tok, 256, stop)
    with pytest.raises(UserError, match="needs --constrained and --decoder ar"):
        from diffgr2_trl.commands.evaluate import EvaluateArguments

        EvaluateArguments(model_name_or_path="m", dataset_name="d", decoder="block", constrained=True,
                          reuse_valid_outputs=str(path))
