"""Decode throughput: block-diffusion sampler vs AR ``generate`` on the same weights, in one process.

Both decoders run at a fixed output length (stop tokens disabled), so tokens/s compare like for like; ratios are
measured side by side (interleaved repeats) rather than against numbers from another run.

With ``compile``, two more kinds of rows: ``ar_compiled`` (transformers' static cache + ``torch.compile``, the fast
AR baseline) and ``block_diffusion_compiled`` (the sampler's static cache + compiled step forward). ``speedup_vs_ar``
is then against the *faster* AR row of the batch size, so a speedup is never claimed against a slow baseline only;
``speedup_vs_ar_eager`` keeps the ratio to eager ``generate``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..block_diffusion import BlockDiffusionSampler, BlockDiffusionSpec, get_spec
from ..block_diffusion.attention import cpu_gqa_attention


@dataclass
class DecodeRow:
    method: str  # "ar", "ar_compiled", "block_diffusion" or "block_diffusion_compiled"
    block_size: int | None
    batch_size: int
    tokens_per_step: int | None
    tau: float | None
    tokens_per_s: float
    forward_passes: int
    tokens_per_forward: float
    seconds: float
    # Row accounting: each row's tokens per forward it took part in (mean over rows), and the row-forwards actually
    # computed (rows summed over forwards; AR: batch x tokens), so work spent on rows that did not need it shows.
    row_tokens_per_forward: float = 1.0
    row_forwards: int = 0
    tokens_per_row_forward: float = 1.0
    speedup_vs_ar: float = 1.0
    speedup_vs_ar_eager: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["tokens_per_step"] is None:
            d.pop("tokens_per_step")
        if d["tau"] is None:
            d.pop("tau")
        return d


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def bench_decode(
    model,
    prompts: torch.Tensor,
    *,
    new_tokens: int = 128,
    batch_sizes: tuple[int, ...] = (1, 16),
    block_sizes: tuple[int, ...] = (8, 16, 32),
    tokens_per_step: int = 4,
    taus: tuple[float, ...] = (0.9, 0.7, 0.5),
    tau_block_size: int | None = None,
    repeats: int = 3,
    mask_token_id: int | None = None,
    progress: bool = True,
    compile: bool | dict = False,
) -> list[DecodeRow]:
    """Measure AR ``generate`` vs the block sampler (fixed tokens/step per block size, and tau thresholds).

    Args:
        prompts: ``(N, P)`` prompt ids (no padding), N >= max(batch_sizes); rows are reused for each batch size.
        tau_block_size: block size of the tau rows (default: the model's spec, else 32).
        mask_token_id: needed when the model is not converted (speed needs no trained weights).
        compile: add the compiled rows (``True``: ``torch.compile`` mode ``"reduce-overhead"``, CUDA graphs on a GPU;
            or a dict of ``torch.compile`` keyword arguments for both decoders, e.g. ``{"backend": "eager"}``).
    """
    from tqdm.auto import tqdm

    try:
        base_spec = get_spec(model)
    except ValueError:
        if mask_token_id is None:
            raise
        base_spec = BlockDiffusionSpec(block_size=tau_block_size or 32, mask_token_id=mask_token_id)
    tau_bs = tau_block_size or base_spec.block_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    configs = [("ar", None, None, None)] + ([("ar_compiled", None, None, None)] if compile else [])
    block_methods = ["block_diffusion"] + (["block_diffusion_compiled"] if compile else [])
    configs += [(m, bs, tokens_per_step, None) for m in block_methods for bs in block_sizes]
    configs += [(m, tau_bs, None, tau) for m in block_methods for tau in taus]
    rows: list[DecodeRow] = []
    bar = tqdm(total=len(batch_sizes) * len(configs), desc="bench-decode", disable=not progress)
    for b in batch_sizes:
        ids = prompts[:b]
        am = torch.ones_like(ids)
        batch_rows = []
        for method, bs, k, tau in configs:
            run = _decoder(model, method, ids, am, new_tokens, base_spec, bs, k, tau, pad, compile)
            run()  # warm-up (and compilation)
            sec, out = _timed(run, repeats)
            if method.startswith("ar"):
                row = DecodeRow(method, bs, b, k, tau, b * new_tokens / sec, new_tokens, 1.0, sec,
                                row_forwards=b * new_tokens)
            else:
                row = DecodeRow(method, bs, b, k, tau, b * new_tokens / sec, out.forward_passes,
                                out.tokens_per_forward, sec,
                                row_tokens_per_forward=float(out.row_tokens_per_forward.mean()),
                                row_forwards=out.computed_row_forwards,
                                tokens_per_row_forward=out.tokens_per_computed_row_forward)
            batch_rows.append(row)
            bar.update()
        eager_ar = next(r.tokens_per_s for r in batch_rows if r.method == "ar")
        best_ar = max(r.tokens_per_s for r in batch_rows if r.method.startswith("ar"))
        for row in batch_rows:
            row.speedup_vs_ar = row.tokens_per_s / best_ar
            row.speedup_vs_ar_eager = row.tokens_per_s / eager_ar
        rows += batch_rows
    bar.close()
    return rows


def _compile_options(compile: bool | dict) -> dict:
    return dict(mode="reduce-overhead", dynamic=False) if compile is True else dict(compile)


def _decoder(model, method, ids, am, new_tokens, base_spec, bs, k, tau, pad, compile):
    """A no-argument callable decoding the batch once with ``method``."""
    if method.startswith("ar"):
        extra = {}
        if method == "ar_compiled":
            from transformers import CompileConfig

            config = CompileConfig(**_compile_options(compile))
            config._compile_all_devices = True  # transformers compiles on GPUs only unless told otherwise
            extra = dict(cache_implementation="static", compile_config=config)

        def run():
            # the AR baseline gets the sampler's CPU attention path too, so the ratio compares decoders, not kernels
            with cpu_gqa_attention(model):
                return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None,
                                      **extra)
        return run
    spec = BlockDiffusionSpec(**{**base_spec.to_dict(), "block_size": bs})
    compiled = method == "block_diffusion_compiled"
    sampler = BlockDiffusionSampler(model, spec, eos_token_id=[], pad_token_id=pad,
                                    cache_implementation="static" if compiled else "dynamic",
                                    compile=_compile_options(compile) if compiled else False)

    def run():
        return sampler.generate(ids, am, max_completion_length=new_tokens, tokens_per_step=k, tau=tau)
    return run


def format_rows(rows: list[DecodeRow]) -> str:
    lines = ["| method | block | batch | schedule | tokens/s | forwards | tokens/forward | row tokens/forward "
             "| row-forwards computed | tokens/computed row-forward | speedup vs fastest AR | vs eager AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sched = ("-" if r.method.startswith("ar") else
                 (f"{r.tokens_per_step}/step" if r.tokens_per_step else f"tau={r.tau}"))
        lines.append(f"| {r.method} | {r.block_size or '-'} | {r.batch_size} | {sched} | {r.tokens_per_s:.1f} | "
                     f"{r.forward_passes} | {r.tokens_per_forward:.2f} | {r.row_tokens_per_forward:.2f} | "
                     f"{r.row_forwards} | {r.tokens_per_row_forward:.2f} | {r.speedup_vs_ar:.2f}x | "
                     f"{r.speedup_vs_ar_eager:.2f}x |")
    return "\n".join(lines)
