"""Decoding in several CPU processes at once (``diffgr2 evaluate --workers N``).

On a small CPU a small model's decoding is bound by per-step overhead and small matrix products, which a second
intra-op thread shortens little; two single-thread processes use two cores better than one two-thread process
(``results/decode_at_batch.md`` has the measurement). :class:`DecodePool` starts child processes that each load the
model from its directory once and then decode whole batches as they free up, beside this process, so a slow batch
does not hold the others back and every batch is the batch one process would have decoded (its rows, its padding).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

__all__ = ["DecodePool"]

_worker: dict[str, Any] = {}  # in a worker process: its model, tokenizer and decode function


def _start_worker(model_name_or_path: str, decoder: str, decoding, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import DECODERS

    torch.set_num_threads(threads)
    _worker["tokenizer"] = AutoTokenizer.from_pretrained(model_name_or_path)
    _worker["model"] = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32).eval()
    _worker["decode"] = DECODERS[decoder](config=decoding)


def _decode_batch(prompts: list[str], max_new_tokens: int, candidates: list | None) -> tuple[list[str], dict]:
    extra = {"candidates": candidates} if candidates is not None else {}
    return _worker["decode"](_worker["model"], _worker["tokenizer"], prompts, max_new_tokens, **extra)


class DecodePool:
    """Child processes (``spawn``ed on entry) that decode batches with a saved model on the CPU, beside this process.

    Args:
        model_name_or_path: the model directory (its tokenizer saved alongside); each child loads it in float32.
        decoder: a key of :data:`~diffgr2_trl.rerank.evaluate.DECODERS`.
        decoding: the decoder's :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`.
        processes: child processes (at least 1).
        threads: torch intra-op threads in each child.

    Use as a context manager. :meth:`decode` yields each batch's result as soon as it is done; this process can take
    batches too (``here``), which also covers the seconds a child spends starting (importing torch and transformers).
    """

    def __init__(self, model_name_or_path: str, decoder: str, decoding, processes: int, threads: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"DecodePool needs at least 1 child process, got {processes}.")
        if threads < 1:
            raise ValueError(f"threads must be at least 1 per process, got {threads}.")
        self.processes, self.threads = processes, threads
        self._args = (str(model_name_or_path), decoder, decoding, threads)
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> DecodePool:
        # OMP_NUM_THREADS is read when a child's torch starts: set it for the children only.
        env = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        try:
            self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=self._args)
        finally:
            if env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def decode(self, batches: Sequence[tuple[list[str], list | None]], max_new_tokens: int,
               here: Callable[[list[str], list | None], tuple[list[str], dict]] | None = None,
               ) -> Iterator[tuple[int, list[str], dict]]:
        """Decode ``batches`` (prompts, candidates or None) and yield ``(batch index, texts, stats)`` as each batch
        finishes, in any order. Each child holds one batch at a time and gets the next one as it finishes;
        ``here(prompts, candidates)``, when given, decodes a batch in this process whenever it is free. A child's error
        is raised here, and the batches not started are dropped."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("DecodePool.decode runs inside 'with DecodePool(...) as pool:'.")
        todo, lock, stopped = iter(range(len(batches))), threading.Lock(), threading.Event()
        finished: queue.Queue[tuple[int, Future]] = queue.Queue()

        def take() -> int | None:
            with lock:
                return None if stopped.is_set() else next(todo, None)

        def send_next() -> None:  # also runs in the executor's thread, as a finished batch's callback
            if (i := take()) is None:
                return
            prompts, candidates = batches[i]
            future = executor.submit(_decode_batch, prompts, max_new_tokens, candidates)
            future.add_done_callback(lambda f, i=i: finished.put((i, f)))
            future.add_done_callback(lambda f: send_next() if not f.cancelled() and f.exception() is None else None)

        try:
            # Children start on their first batch, which costs seconds (torch and transformers import): with this
            # process decoding too, a few batches are not worth it.
            for _ in range(self.processes if here is None or len(batches) >= 4 * self.processes else 0):
                send_next()
            for _ in range(len(batches)):
                try:
                    i, future = finished.get_nowait()
                except queue.Empty:
                    if here is not None and (i := take()) is not None:
                        yield (i, *here(*batches[i]))
                        continue
                    i, future = finished.get()
                yield (i, *future.result())
        finally:
            stopped.set()
