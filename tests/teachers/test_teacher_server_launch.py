"""Server launcher failure reporting and the benchmark command (cheap paths; the real server is in test_teacher_vllm)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffgr2_trl.teachers.server import VLLMServerError, find_free_port, wait_for_health


def test_wait_for_health_reports_a_dead_server_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("loading model\nValueError: no such model: /nope\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.log_path = str(log)
    with pytest.raises(VLLMServerError, match=r"(?s)exited with code 3.*no such model: /nope"):
        wait_for_health(f"http://127.0.0.1:{find_free_port()}", timeout=30, process=process, interval=0.05)


def test_wait_for_health_times_out():
    with pytest.raises(VLLMServerError, match="not healthy after"):
        wait_for_health(f"http://127.0.0.1:{find_free_port()}", timeout=0.3, interval=0.05)


def test_bench_teacher_hf_only(tmp_path):
    from diffgr2_trl.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench-teacher", "--shape", "tiny", "--vocab_size", "64", "--seq_len", "24", "--completion_len", "8"]
    argv += ["--num_sequences", "3", "--backends", "hf", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["backend"].split(" (")[0] for r in result["results"]] == ["HF in-process"]
    assert result["results"][0]["completion_tok_per_s"] > 0
