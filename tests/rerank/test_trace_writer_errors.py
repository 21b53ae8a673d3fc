"""The LLM trace writer falls back to offline traces only for transient, per-prompt failures (retries exhausted) and
counts them; a client error such as a wrong model name (HTTP 404) stops the run."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diffgr2_trl.errors import UserError
from diffgr2_trl.rerank.traces import LLMTraceWriter
from tests.rerank.test_traces import _row


@pytest.fixture
def status_server():
    """A server whose POSTs all answer with the status code written into ``state["code"]``."""
    state = {"code": 404, "calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": "served", "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            state["calls"] += 1
            self._send(state["code"], {"error": {"message": "The model `wrong` does not exist.", "code": state["code"]}})

        def _send(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_a_wrong_model_name_fails_loudly(status_server):
    url, state = status_server
    writer = LLMTraceWriter(url, "wrong", n=1, backoff=0.01, max_retries=2)
    with pytest.raises(UserError, match=r"model 'wrong' with HTTP 404.*does not exist"):
        writer.write([_row(0), _row(1)])
    assert state["calls"] <= 2  # not retried
    assert writer.failed_prompts == 0


def test_transient_failures_fall_back_per_prompt_and_are_counted(status_server):
    url, state = status_server
    state["code"] = 503
    writer = LLMTraceWriter(url, "served", n=1, backoff=0.01, max_retries=1, concurrency=1)
    results = writer.write([_row(0), _row(1)])
    assert [r.source for r in results] == ["offline", "offline"]
    assert all("503" in r.error for r in results)
    assert writer.failed_prompts == 2 and state["calls"] == 4
