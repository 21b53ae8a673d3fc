"""Trace writers: offline traces are deterministic and argue for the top item; the LLM writer's mechanics (rejection
sampling, retries, timeouts, bounded concurrency, server-down error) against a stub OpenAI server on 127.0.0.1."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.prompts import ItemText, build_prompt, format_completion, target_ranking
from diffgr2_trl.rerank.tokenizer import attr_tokens, sid_level_tokens, train_rerank_tokenizer
from diffgr2_trl.rerank.traces import (
    LLMTraceWriter,
    ServerUnavailableError,
    offline_completion,
    offline_explanation,
    supported_ranking,
)


def _example(seed=0, n_hist=20):
    rng = random.Random(seed)
    items = [
        ItemText(
            "".join(f"<{lvl}_{rng.randrange(64)}>" for lvl in "abcd"),
            tuple(f"<attr_{rng.randrange(12)}>" for _ in range(3)),
        )
        for _ in range(n_hist + 10)
    ]
    return items[:n_hist], items[n_hist:]


def test_offline_trace_is_deterministic_and_supports_top_choice():
    hist, cands = _example()
    ranking = target_ranking([c.sid for c in cands], cands[6].sid)
    text = offline_explanation(hist, cands, ranking)
    assert text == offline_explanation(hist, cands, ranking)
    final = text.split("4) ")[1]
    assert final.startswith(f"So {cands[6].sid} ranks first (pre-ranked 7)")
    assert text.count("<a_") >= 3  # cites items by semantic ID
    # Whatever the target, the conclusion argues for it; its evidence is quoted if it has any.
    for i, cand in enumerate(cands):
        ranking = target_ranking([c.sid for c in cands], cand.sid)
        final = offline_explanation(hist, cands, ranking).split("4) ")[1]
        assert final.startswith(f"So {cand.sid} ranks first (pre-ranked {i + 1})")
        if any(set(cand.attrs) & set(h.attrs) for h in hist):
            assert f"{cand.sid} shares" in final


def test_offline_trace_can_cite_other_candidates_by_position():
    """``cite_others_by="position"``: the only candidate ID the explanation writes is the answer's first one, and the
    rest of the text is the ``"sid"`` text with each other candidate's ID replaced by ``candidate k``."""
    hist, cands = _example()
    sids = [c.sid for c in cands]
    ranking = target_ranking(sids, cands[6].sid)
    by_sid = offline_explanation(hist, cands, ranking)
    by_pos = offline_explanation(hist, cands, ranking, cite_others_by="position")
    assert [s for s in sids if s in by_pos] == [cands[6].sid]
    assert sum(s in by_sid for s in sids) >= 2  # the default cites others by ID (the pre-ranker's first, at least)
    expected = by_sid
    for k, s in enumerate(sids):
        if s != cands[6].sid:
            expected = expected.replace(s, f"candidate {k + 1}")
    assert by_pos == expected
    with pytest.raises(ValueError, match="cite_others_by"):
        offline_explanation(hist, cands, ranking, cite_others_by="name")


def test_supported_ranking_promotes_only_what_the_evidence_singles_out():
    """The target goes first only when it is the candidate sharing attributes with the most history items (the
    offline writer's own choice); otherwise the pre-rank order stands, as rank-reward rejection sampling keeps it."""
    hist = [ItemText("<a_1><b_1><c_1><d_1>", ("<attr_1>",)), ItemText("<a_2><b_2><c_2><d_2>", ("<attr_1>", "<attr_2>")),
            ItemText("<a_3><b_3><c_3><d_3>", ("<attr_3>",))]
    cands = [ItemText(f"<a_9><b_9><c_9><d_{i}>", attrs) for i, attrs in enumerate(
        [("<attr_3>",), ("<attr_7>",), ("<attr_1>",), ("<attr_2>",), ("<attr_8>",)])]
    order = [c.sid for c in cands]
    # candidate 3 (<attr_1>) matches two history items, every other candidate at most one: the evidence's pick
    assert supported_ranking(hist, cands, order[2]) == target_ranking(order, order[2])
    for target in (order[1], order[3], order[4]):  # evidence points elsewhere (or nowhere): keep the pre-rank order
        assert supported_ranking(hist, cands, target) == order
    assert supported_ranking(hist, cands, order[0]) == order  # already first
    # ties in strength keep the pre-rank order's choice: with <attr_1> gone, candidates 1 and 4 match one item each,
    # the most recent match decides (candidate 1: the last item), so promoting candidate 4 is not supported
    flat = [cands[0], cands[1], ItemText(cands[2].sid, ()), cands[3], cands[4]]
    assert supported_ranking(hist, flat, order[3]) == order
    with pytest.raises(ValueError, match="not among the candidates"):
        supported_ranking(hist, cands, "<a_0><b_0><c_0><d_0>")


def test_offline_trace_from_prompt_and_token_length():
    rows = []
    for seed in range(30):
        hist, cands = _example(seed)
        prompt = build_prompt(hist, cands)
        rows.append(
            (prompt, offline_completion(prompt, cands[seed % 10].sid), cands[seed % 10].sid, [c.sid for c in cands])
        )
    for _prompt, completion, target, sids in rows:
        parsed = parse_ranking(completion, sids)
        assert parsed.valid and parsed.ranking[0] == target
    tok = train_rerank_tokenizer(
        [t for r in rows for t in r[:2]], sid_level_tokens(64), attr_tokens(12), vocab_size=800
    )
    lengths = [len(tok(parse_ranking(c, s).explanation)["input_ids"]) for _, c, _, s in rows]
    assert 90 <= min(lengths) and max(lengths) <= 160
    assert offline_explanation([], [], ["<a_1><b_1><c_1><d_1>"])  # degenerate input does not crash


class _Stub:
    """A tiny OpenAI-compatible server: canned texts, optional failures/latency, counts concurrent requests."""

    def __init__(self, texts, fail_first=0, sleep=0.0, slow_first=0.0):
        self.texts, self.fail_first, self.sleep, self.slow_first = texts, fail_first, sleep, slow_first
        self.calls, self.in_flight, self.max_in_flight, self.bodies = 0, 0, 0, []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.calls += 1
                    call = stub.calls
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    time.sleep(stub.slow_first if call == 1 else stub.sleep)
                    if call <= stub.fail_first:
                        code, payload = 503, {"error": "overloaded"}
                    else:
                        texts = stub.texts(body["prompt"]) if callable(stub.texts) else stub.texts
                        choices = [{"index": i, "text": t, "finish_reason": "stop"}
                                   for i, t in enumerate(texts[: body["n"]])]
                        code, payload = 200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                              "choices": choices}
                finally:
                    # done before the answer leaves: a client that sends its next request on receiving this one must
                    # not find it still counted (on loaded cores this thread can stall between the two)
                    with stub.lock:
                        stub.in_flight -= 1
                try:
                    self._send(code, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    stubs = []

    def make(*args, **kwargs):
        stubs.append(_Stub(*args, **kwargs))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def _row(seed=0, target_pos=5):
    hist, cands = _example(seed)
    sids = [c.sid for c in cands]
    return {"prompt": build_prompt(hist, cands), "candidates": sids, "target": sids[target_pos]}


def _move(sids, target, to):
    rest = [s for s in sids if s != target]
    return rest[:to] + [target] + rest[to:]


def test_rejection_sampling_keeps_best_promoting_sample(stub_factory):
    row = _row()
    sids, target = row["candidates"], row["target"]
    texts = [
        "garbage",
        format_completion("moved to 3", _move(sids, target, 3)),  # reward 0.2
        json.dumps({"explanation": "best", "recommendations": _move(sids, target, 1)}, indent=2) + "<eos>",  # 0.4
        format_completion("dup", sids[:9] + sids[:1]),
    ]
    stub = stub_factory(texts)
    writer = LLMTraceWriter(stub.url + "/v1", "stub-model", n=4, max_tokens=50, seed=1, backoff=0.01)
    [result] = writer.write([row])
    assert result.source == "llm" and result.reward == pytest.approx(0.4) and result.n_valid == 2
    assert result.completion == format_completion("best", _move(sids, target, 1))  # re-serialised canonically
    body = stub.bodies[0]
    assert body["model"] == "stub-model" and body["n"] == 4 and body["prompt"] == row["prompt"] and body["seed"] == 1


def test_falls_back_to_offline_when_no_sample_promotes(stub_factory):
    row = _row()
    sids = row["candidates"]
    stub = stub_factory([format_completion("copy", sids), "{"])  # copying the pre-rank order is rejected
    [result] = LLMTraceWriter(stub.url, "m", n=2).write([row])
    assert result.source == "offline" and result.reward is None and result.n_valid == 1
    assert result.ranking == target_ranking(sids, row["target"])
    assert result.completion == offline_completion(row["prompt"], row["target"])


def test_keeps_target_first_when_it_already_was(stub_factory):
    row = _row(target_pos=0)
    stub = stub_factory([format_completion("keep", row["candidates"])])
    [result] = LLMTraceWriter(stub.url, "m", n=1).write([row])
    assert result.source == "llm" and result.reward == 0.0


def test_retries_on_server_errors_and_timeouts(stub_factory):
    row = _row()
    good = format_completion("ok", _move(row["candidates"], row["target"], 0))
    stub = stub_factory([good], fail_first=2)
    [result] = LLMTraceWriter(stub.url, "m", n=1, backoff=0.01, max_retries=2).write([row])
    assert result.source == "llm" and stub.calls == 3
    # A request that exceeds the timeout is retried too.
    slow = stub_factory([good], slow_first=1.0)
    [result] = LLMTraceWriter(slow.url, "m", n=1, timeout=0.3, backoff=0.01, max_retries=1).write([row])
    assert result.source == "llm" and slow.calls == 2
    # Retries exhausted: the row falls back to the offline trace and records why.
    failing = stub_factory([good], fail_first=10)
    [result] = LLMTraceWriter(failing.url, "m", n=1, backoff=0.01, max_retries=1).write([row])
    assert result.source == "offline" and "503" in result.error and failing.calls == 2


def test_bounded_concurrency_and_row_order(stub_factory):
    rows = [_row(seed=s, target_pos=s % 10) for s in range(8)]

    def texts(prompt):  # answer each prompt with its own target first
        row = next(r for r in rows if r["prompt"] == prompt)
        return [format_completion("t", _move(row["candidates"], row["target"], 0))]

    stub = stub_factory(texts, sleep=0.1)
    results = LLMTraceWriter(stub.url, "m", n=1, concurrency=3).write(rows)
    assert [r.ranking[0] for r in results] == [r["target"] for r in rows]
    assert 1 < stub.max_in_flight <= 3


def test_clear_error_when_server_is_down():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    writer = LLMTraceWriter(f"http://127.0.0.1:{port}", "my-model", timeout=2)
    with pytest.raises(ServerUnavailableError, match=rf"127.0.0.1:{port}/v1/models.*vllm"):
        writer.write([_row()])


def test_prepared_rows_follow_the_target_rule():
    """``build_rows(targets=...)``: ``label`` rows put the true next item first; ``supported`` rows do so only where
    the evidence singles it out and keep the pre-rank order elsewhere; the ``target`` column is the truth in both."""
    from diffgr2_trl.rerank.pipeline_data import build_rows
    from diffgr2_trl.rerank.prompts import parse_prompt
    from diffgr2_trl.rerank.semantic_ids import SemanticIds

    rng = random.Random(0)
    attrs = {i: [f"<attr_{rng.randrange(6)}>" for _ in range(2)] for i in range(60)}
    sids = SemanticIds({i: (i % 5, i % 7, i % 3, i) for i in attrs}, 64, attrs)
    examples = []
    for u in range(40):
        items = rng.sample(range(60), 16)
        examples.append({"user_id": u, "history": items[:6], "candidates": items[6:], "target": items[6 + u % 10]})
    label, supported = build_rows(examples, sids), build_rows(examples, sids, targets="supported")
    promoted = 0
    for a, b in zip(label, supported):
        assert a["prompt"] == b["prompt"] and a["target"] == b["target"] and a["candidates"] == b["candidates"]
        assert parse_ranking(a["completion"], a["candidates"]).ranking[0] == a["target"]
        history, cands = parse_prompt(b["prompt"])
        ranking = parse_ranking(b["completion"], b["candidates"]).ranking
        assert ranking == supported_ranking(history, cands, b["target"])
        assert ranking in (b["candidates"], target_ranking(b["candidates"], b["target"]))
        promoted += ranking != b["candidates"]
    assert 0 < promoted < sum(r["target"] != r["candidates"][0] for r in label)
    with pytest.raises(ValueError, match="targets must be one of"):
        build_rows(examples[:1], sids, targets="oracle")
