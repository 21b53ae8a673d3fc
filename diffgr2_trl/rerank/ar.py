"""Training the autoregressive GR2 re-ranker (the teacher Diffusion-GR2 starts from) with TRL itself.

Two stages, both stock TRL trainers:

1. SFT: :class:`trl.SFTTrainer` on ``prompt`` -> ``completion`` (offline reasoning trace + target ranking), loss on
   completion tokens only.
2. RL: :class:`trl.GRPOTrainer` with ``loss_type="dapo"`` and :data:`diffgr2_trl.rerank.scoring.gr2_reward` (rank promotion +
   conditional format bonus, -1 for invalid output) on the train prompts.

The model is either built from a config with the local tokenizer (CPU runs and tests) or loaded from a checkpoint
path (a real Qwen3 on a GPU), in which case the semantic-ID, attribute and answer-template tokens are added to the
checkpoint's own tokenizer and the embeddings resized (:func:`ar_model_and_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import accelerator_type
from .pipeline_data import load_split, load_tokenizer
from .prompts import FORMAT_PIECES
from .semantic_ids import SemanticIds
from .tokenizer import encode_prompt_completion

__all__ = ["ARTrainArguments", "ar_model_and_tokenizer", "make_grpo_config", "make_sft_config", "run_grpo",
           "run_mid", "run_sft"]


@dataclass
class ARTrainArguments:
    """Arguments of ``diffgr2 train-ar`` (TRL's own ``SFTConfig`` / ``GRPOConfig`` are built from them).

    Stage-specific knobs carry an ``sft_`` / ``rl_`` prefix because both stages run in one command.

    Parameters:
        dataset_name: ``diffgr2 prepare`` output directory (``--prepared``: deprecated spelling).
        output_dir: output directory; the SFT model goes to ``output_dir/sft``, the RL model to ``output_dir/rl``
            (``--out``: deprecated spelling).
        stage: ``mid`` (SID mid-training on the prepared ``mid`` split, :mod:`~diffgr2_trl.rerank.midtrain`),
            ``sft`` (starts from ``output_dir/mid`` when ``all`` ran it), ``rl`` (starts from ``output_dir/sft`` unless
            ``model_name_or_path`` is given) or ``all`` (mid when ``mid_max_steps > 0``, then sft, then rl).
        preset: ``cpu`` or ``gpu`` (YAML defaults under ``diffgr2_trl/presets/``); explicit options override them.
        model_name_or_path: a checkpoint to start from; ``None`` builds ``arch``/``shape`` from a config with the
            local tokenizer.
        arch / shape: the config-built model (:data:`diffgr2_trl.modeling.MODEL_SHAPES`).
        use_peft / lora_r / lora_alpha: LoRA through PEFT (embeddings of the added tokens are trained fully).
        threads: torch intra-op CPU threads (0: torch's default; :func:`diffgr2_trl.utils.set_threads`).
        max_length: SFT sequence cap (prompt + completion tokens).
        mid_source: where mid-training lists come from: ``fresh`` (new seeded lists every step from the training
            sequences, trained by the copy-learning loop of :mod:`diffgr2_trl.rerank.copying`: no list repeats, the output
            layer runs on completion positions only, ~3x fewer seconds per list than SFTTrainer at CPU scale) or
            ``prepared`` (the ``mid`` split that ``prepare --mid_rows`` wrote, with TRL's SFTTrainer).
        mid_*: mid-training steps, batch size (lists per step), learning rate, sequence cap (``prepared``), task mix
            (and ``mid_mix_end``, the mix at the last step: a linear curriculum, ``fresh`` only), warm-up, schedule
            (``cosine`` decays to ``mid_min_lr_ratio`` of the peak), held-out ``front`` lists scored
            at the end (``fresh``; 0: none).
        sft_*: SFT epochs / max steps (> 0 overrides epochs), batch size, gradient accumulation, learning rate,
            number of train rows used.
        rl_*: GRPO steps, prompts per step x generations, learning rate, completion cap, sampling temperature,
            KL coefficient, number of train rows used; ``rl_constrained`` samples the rollouts under the ranking
            constraint (:class:`~diffgr2_trl.rerank.constrained_rl.ConstrainedRolloutGRPOTrainer`).
    """

    dataset_name: str = field(metadata={"help": "diffgr2 prepare output directory."})
    output_dir: str = field(metadata={"help": "Output directory (output_dir/sft, output_dir/rl)."})
    stage: str = field(default="all", metadata={"help": "mid, sft, rl or all."})
    preset: str | None = field(
        default=None,
        metadata={"help": "train-ar's defaults: cpu or gpu (diffgr2_trl/presets/ar_*.yaml; the pipeline has its own)."},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint to start from."})
    arch: str = field(default="qwen3", metadata={"help": "Architecture of a config-built model."})
    shape: str = field(default="small", metadata={"help": "Shape of a config-built model."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU (chosen anyway on a machine without a CUDA, XPU or MPS device)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU only)."})
    threads: int = field(default=0, metadata={"help": "torch threads on CPU (0: default)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    allow_other_data: bool = field(
        default=False,
        metadata={"help": "Start from a model trained on other prepared data (other semantic IDs/tokenizer) anyway."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    max_length: int = field(default=640, metadata={"help": "SFT sequence cap (tokens)."})
    mid_max_steps: int = field(default=0, metadata={"help": "SID mid-training steps (0: no mid stage in 'all')."})
    mid_batch_size: int = field(default=32, metadata={"help": "Mid-training per-device batch size."})
    mid_learning_rate: float = field(default=3e-3, metadata={"help": "Mid-training learning rate."})
    mid_max_length: int = field(default=400, metadata={"help": "Mid-training sequence cap (tokens, prepared source)."})
    mid_source: str = field(default="fresh", metadata={"help": "fresh (new lists every step) or prepared (mid split)."})
    mid_mix: str | None = field(default=None, metadata={"help": "Mid-training task weights (fresh source)."})
    mid_mix_end: str | None = field(
        default=None, metadata={"help": "Mid-training task weights at the last step: a linear curriculum from mid_mix."})
    mid_warmup_steps: int = field(default=50, metadata={"help": "Mid-training warm-up steps (fresh source)."})
    mid_schedule: str = field(default="cosine", metadata={"help": "Mid-training LR schedule: cosine or constant."})
    mid_min_lr_ratio: float = field(default=0.02, metadata={"help": "Cosine floor as a share of the peak LR."})
    mid_eval_lists: int = field(default=64, metadata={"help": "Held-out front lists scored after mid-training."})
    sft_epochs: float = field(default=1.0, metadata={"help": "SFT epochs."})
    sft_max_steps: int = field(default=-1, metadata={"help": "SFT steps (> 0 overrides epochs)."})
    sft_batch_size: int = field(default=8, metadata={"help": "SFT per-device batch size."})
    sft_grad_accum: int = field(default=1, metadata={"help": "SFT gradient accumulation."})
    sft_learning_rate: float = field(default=1e-3, metadata={"help": "SFT learning rate."})
    sft_max_examples: int | None = field(default=None, metadata={"help": "SFT train rows used (None: all)."})
    rl_max_steps: int = field(default=20, metadata={"help": "GRPO steps."})
    rl_prompts_per_step: int = field(default=2, metadata={"help": "Prompts per GRPO step."})
    rl_num_generations: int = field(default=4, metadata={"help": "Completions per prompt (group size)."})
    rl_learning_rate: float = field(default=1e-5, metadata={"help": "GRPO learning rate."})
    rl_max_completion_length: int = field(default=224, metadata={"help": "GRPO completion cap (tokens)."})
    rl_temperature: float = field(default=1.0, metadata={"help": "GRPO sampling temperature."})
    rl_beta: float = field(default=0.0, metadata={"help": "KL coefficient (0: no reference model)."})
    rl_max_examples: int | None = field(default=None, metadata={"help": "GRPO train rows used (None: all)."})
    rl_constrained: bool = field(
        default=False,
        metadata={"help": "Sample GRPO rollouts under the ranking constraint: every rollout is a valid permutation."})

    def __post_init__(self) -> None:
        if self.stage not in {"mid", "sft", "rl", "all"}:
            raise ValueError(f"--stage must be mid, sft, rl or all, got {self.stage!r}.")
        if self.mid_source not in {"fresh", "prepared"}:
            raise ValueError(f"--mid_source must be fresh or prepared, got {self.mid_source!r}.")
        if self.mid_schedule not in {"cosine", "constant"}:
            raise ValueError(f"--mid_schedule must be cosine or constant, got {self.mid_schedule!r}.")
        self.use_cpu = bool(self.use_cpu) or accelerator_type() is None
        if self.use_cpu and self.bf16:
            raise ValueError("bf16 needs a GPU; drop --bf16 on CPU.")


def added_tokens(sids: SemanticIds) -> list[str]:
    """Tokens a pretrained tokenizer must learn as atoms: SID levels, attributes and the answer-template pieces."""
    return [*FORMAT_PIECES, *sids.tokens(), *sids.attribute_vocab()]


def ar_model_and_tokenizer(args: ARTrainArguments, start: str | None = None):
    """``(model, tokenizer)``: from ``start`` / ``args.model_name_or_path`` if given, else a config-built model.

    A checkpoint keeps its tokenizer, extended with the task tokens (:func:`added_tokens`) and a pad token if it has
    none; embeddings are resized (``mean_resizing`` initialises new rows at the mean embedding). Loading is
    :func:`diffgr2_trl.modeling.load_model_and_tokenizer`'s.
    """
    from diffgr2_trl.modeling import build_model, load_model_and_tokenizer

    path = start or args.model_name_or_path
    if path is None:
        tokenizer = load_tokenizer(args.dataset_name)
        model = build_model(args.arch, tokenizer=tokenizer, shape=args.shape, max_position_embeddings=1024, seed=args.seed)
        return model, tokenizer
    sids = SemanticIds.load(Path(args.dataset_name) / "semantic_ids.json")
    return load_model_and_tokenizer(path, dtype="bfloat16" if args.bf16 else "float32", add_tokens=added_tokens(sids))


def _peft_config(args: ARTrainArguments, n_added: int):
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        # New task tokens have no pretrained embedding: train embedding/output rows in full.
        modules_to_save=["embed_tokens", "lm_head"] if n_added else None,
    )


def _common(args: ARTrainArguments, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        use_cpu=args.use_cpu,
        bf16=args.bf16,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def make_sft_config(args: ARTrainArguments, output_dir: str, stage: str = "sft"):
    """TRL ``SFTConfig`` of the ``sft`` stage or, with ``stage="mid"``, of SID mid-training."""
    from trl import SFTConfig

    if stage == "mid":
        schedule = dict(num_train_epochs=1.0, max_steps=args.mid_max_steps, per_device_train_batch_size=args.mid_batch_size,
                        gradient_accumulation_steps=1, learning_rate=args.mid_learning_rate, max_length=args.mid_max_length)
    else:
        schedule = dict(num_train_epochs=args.sft_epochs, max_steps=args.sft_max_steps,
                        per_device_train_batch_size=args.sft_batch_size, gradient_accumulation_steps=args.sft_grad_accum,
                        learning_rate=args.sft_learning_rate, max_length=args.max_length)
    return SFTConfig(
        **_common(args, output_dir),
        **schedule,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        completion_only_loss=True,
    )


def make_grpo_config(args: ARTrainArguments, output_dir: str):
    from trl import GRPOConfig

    g = args.rl_num_generations
    return GRPOConfig(
        **_common(args, output_dir),
        max_steps=args.rl_max_steps,
        per_device_train_batch_size=args.rl_prompts_per_step * g,
        num_generations=g,
        learning_rate=args.rl_learning_rate,
        loss_type="dapo",
        beta=args.rl_beta,
        epsilon=0.2,
        max_completion_length=args.rl_max_completion_length,
        temperature=args.rl_temperature,
        log_completions=False,
    )


def _subset(ds, n: int | None, seed: int):
    return ds.shuffle(seed=seed).select(range(min(n, len(ds)))) if n is not None else ds


def _save(trainer, tokenizer, output_dir: str) -> None:
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model that evaluate/convert load directly
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def tokenize_prompt_completion(ds, tokenizer, batch_size: int = 1000):
    """``prompt``/``completion`` rows -> ``input_ids`` + ``completion_mask`` as TRL's SFTTrainer would make them.

    Same result as SFTTrainer's own preparation (:func:`encode_prompt_completion`), but batched: SFTTrainer tokenises
    one row at a time, which with this tokenizer's ~2k added tokens runs at ~250 rows/s on 2 CPU cores, minutes for
    the 100k-row splits.
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids, masks = encode_prompt_completion(batch["prompt"], batch["completion"], tokenizer)
        return {"input_ids": ids, "completion_mask": masks}

    return ds.map(encode, batched=True, batch_size=batch_size, remove_columns=ds.column_names, desc="tokenize")


def run_sft(args: ARTrainArguments, model, tokenizer, output_dir: str, stage: str = "sft") -> dict[str, Any]:
    """SFT with :class:`trl.SFTTrainer` on ``prompt``/``completion``; saves to ``output_dir``.

    ``stage="sft"`` trains on the train split (re-ranking rows), ``stage="mid"`` on the ``mid`` split (SID
    mid-training tasks, written by ``diffgr2 prepare --mid_rows N``).
    """
    from trl import SFTTrainer

    if stage == "mid":
        ds = load_split(args.dataset_name, "mid")
    else:
        ds = _subset(load_split(args.dataset_name, "train"), args.sft_max_examples, args.seed)
    ds = tokenize_prompt_completion(ds.select_columns(["prompt", "completion"]), tokenizer)
    n_added = 0 if args.model_name_or_path is None else 1
    trainer = SFTTrainer(
        model=model,
        args=make_sft_config(args, output_dir, stage),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=_peft_config(args, n_added),
    )
    result = trainer.train()
    _save(trainer, tokenizer, output_dir)
    return {"rows": len(ds), **result.metrics, "log_history": trainer.state.log_history}


def run_mid(args: ARTrainArguments, model, tokenizer, output_dir: str) -> dict[str, Any]:
    """SID mid-training; saves to ``output_dir``. ``mid_source="prepared"`` is :func:`run_sft` on the ``mid`` split.

    ``fresh``: ``mid_max_steps`` steps of ``mid_batch_size`` new lists each
    (:func:`diffgr2_trl.bench.copy.train_copying`), in the prompt format the prepared rows use (with or without the
    ID line, as ``summary.json`` records), then held-out ``front`` exact/valid on ``mid_eval_lists`` lists.
    """
    if args.mid_source == "prepared":
        return run_sft(args, model, tokenizer, output_dir, stage="mid")
    import json

    from .candidates import load_train_sequences
    from .copying import CopyRecipe, make_heldout, rerank_rows_for, train_copying

    summary_path = Path(args.dataset_name) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    id_line = bool(summary.get("id_line", False))
    prerank = Path(args.dataset_name) / "prerank.json"
    n_candidates = int(json.loads(prerank.read_text()).get("n_candidates", 10)) if prerank.is_file() else 10
    sids = SemanticIds.load(Path(args.dataset_name) / "semantic_ids.json")
    sequences = load_train_sequences(args.dataset_name)
    recipe = CopyRecipe(id_line=id_line, mix=args.mid_mix, mix_end=args.mid_mix_end, batch_size=args.mid_batch_size,
                        learning_rate=args.mid_learning_rate, warmup_steps=min(args.mid_warmup_steps, args.mid_max_steps),
                        schedule=args.mid_schedule, min_lr_ratio=args.mid_min_lr_ratio, max_steps=args.mid_max_steps)
    heldout = (make_heldout(sequences, sids, tokenizer, n=args.mid_eval_lists, seed=args.seed, id_line=id_line,
                            n_candidates=n_candidates) if args.mid_eval_lists > 0 else None)
    device = "cpu" if args.use_cpu else accelerator_type()
    model.to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
        points = train_copying(model, tokenizer, sequences, sids, recipe, heldout, eval_steps=args.mid_max_steps,
                               seed=args.seed, n_candidates=n_candidates, evaluate_first=False, progress=False,
                               log_steps=args.logging_steps, rerank_rows=rerank_rows_for(recipe, args.dataset_name))
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    last = points[-1] if points else {}
    print(f"train-ar mid: {last.get('lists')} fresh lists; held-out front lists exact {last.get('exact')}, "
          f"valid {last.get('valid')}")
    return {"rows": last.get("lists", 0), "lists": last.get("lists", 0), "id_line": id_line,
            "train_runtime": round(60 * last.get("train_minutes", 0.0), 1), "heldout": {
                k: last.get(k) for k in ("exact", "valid", "correct")}, "log_history": points}


def run_grpo(args: ARTrainArguments, model, tokenizer, output_dir: str) -> dict[str, Any]:
    """GRPO/DAPO with :class:`trl.GRPOTrainer` and ``gr2_reward`` (:mod:`diffgr2_trl.rerank.scoring`); saves to
    ``output_dir``. ``args.rl_constrained`` samples the rollouts under the ranking constraint."""
    from trl import GRPOTrainer

    from .scoring import gr2_reward, validity

    ds = _subset(load_split(args.dataset_name, "train"), args.rl_max_examples, args.seed + 1)
    ds = ds.select_columns(["prompt", "candidates", "target"])
    if args.rl_constrained:
        from .constrained_rl import ConstrainedRolloutGRPOTrainer as trainer_class
    else:
        trainer_class = GRPOTrainer
    trainer = trainer_class(
        model=model,
        # validity gets weight 0: logged for monitoring, not optimised (gr2_reward already pays -1 for invalid).
        reward_funcs=[gr2_reward, validity],
        args=_with_reward_weights(make_grpo_config(args, output_dir), [1.0, 0.0]),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=_peft_config(args, 0 if args.model_name_or_path is None else 1),
    )
    result = trainer.train()
    _save(trainer, tokenizer, output_dir)
    return {"rows": len(ds), **result.metrics, "log_history": trainer.state.log_history}


def _with_reward_weights(config, weights: list[float]):
    config.reward_weights = weights
    return config
