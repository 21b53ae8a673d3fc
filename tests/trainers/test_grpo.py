"""Diffusion GRPO on TRL's GRPOTrainer: replay exactness inside the trainer, AR identity at block size 1, shared
randomness for stochastic estimators, reward going up on the sort task, TRL's reward plumbing, PEFT, resume, errors."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from datasets import Dataset

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, convert_to_block_diffusion, left_pad
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_dataset, sort_reward, sort_tokenizer
from diffgr2_trl.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer
from tests.helpers import SMALL_SHAPE, train_sort_cft

pytestmark = pytest.mark.usefixtures("one_thread")

ROLLOUT = ("canvas_ids", "step_map", "estimator_seeds")




def _model(block_size: int = 4, seed: int = 0):
    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=seed)
    convert_to_block_diffusion(model, tok, block_size=block_size)
    return model, tok


def _prompts(n: int = 32, seed: int = 1) -> Dataset:
    return sort_dataset(n, seed=seed).remove_columns(["completion", "answer_start"])


def _config(tmp_path, **kw) -> DiffusionGRPOConfig:
    base = dict(use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=12, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                logging_steps=1)
    return DiffusionGRPOConfig(str(tmp_path / "out"), **{**base, **kw})


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward with variance even for a random model (completion lengths differ), so gradients are non-zero."""
    return [float(len(c.split())) for c in completions]


def _spy_sampler_logprobs(trainer) -> dict:
    """Record the sampler's own per-token log-probs of each rollout (what the trainer must reproduce)."""
    seen: dict = {}
    original = trainer._generate_single_turn

    def spy(*args, **kwargs):
        ids, logprobs = original(*args, **kwargs)
        seen["ids"], seen["logprobs"] = ids, logprobs
        return ids, logprobs

    trainer._generate_single_turn = spy
    return seen


def _trainer_logps(trainer, out: dict) -> torch.Tensor:
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    trainer._rollout_ctx = {k: out[k] for k in ROLLOUT}
    try:
        with torch.no_grad():
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, out["completion_ids"].shape[1], compute_entropy=True)
    finally:
        trainer._rollout_ctx = None
    assert entropies is not None and entropies.shape == logps.shape
    return logps


@pytest.mark.parametrize("temperature,recompute", [(0.0, False), (1.0, False), (1.0, True)])
def test_trainer_logps_equal_sampler_logps(tmp_path, temperature, recompute):
    """At fixed weights the trainer's replayed per-token log-probs (the loss's numbers, and TRL's old log-probs with
    num_iterations=2) are the sampler's, greedy and sampled, and with the bounded-memory likelihood."""
    model, tok = _model()
    ds = _prompts()
    trainer = DiffusionGRPOTrainer(model, reward_funcs=sort_reward, processing_class=tok, train_dataset=ds,
                                   args=_config(tmp_path, temperature=temperature, num_iterations=2, top_k=8,
                                                likelihood_recompute=recompute,
                                                max_streams_per_forward=1 if recompute else None))
    seen = _spy_sampler_logprobs(trainer)
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    logps = _trainer_logps(trainer, out)
    old = out["old_per_token_logps"]  # recomputed by the trainer, not copied from the sampler
    checked = 0
    for r, (ids, sampler_lp) in enumerate(zip(seen["ids"], seen["logprobs"])):
        n = len(ids)
        assert n > 0
        torch.testing.assert_close(logps[r, :n], torch.tensor(sampler_lp), atol=1e-5, rtol=0)
        torch.testing.assert_close(old[r, :n], torch.tensor(sampler_lp), atol=1e-5, rtol=0)
        checked += n
    assert checked >= 8 * 4
    if temperature > 0:  # sampled rollouts: the tokens are not all argmax, so this is not the greedy identity
        assert any(lp < -1e-3 for row in seen["logprobs"] for lp in row)


def test_block_size_one_trajectory_likelihood_is_ar(tmp_path):
    """Block size 1 + token shift: the trainer's trajectory likelihood is the AR model's log-likelihood."""
    model, tok = _model(block_size=1)
    ds = _prompts()
    trainer = DiffusionGRPOTrainer(model, reward_funcs=sort_reward, processing_class=tok, train_dataset=ds,
                                   args=_config(tmp_path, temperature=1.0, max_completion_length=6))
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    logps = _trainer_logps(trainer, out)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], torch.ones_like(out["completion_ids"])], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    t = out["completion_ids"].shape[1]
    logits = logits[:, -t - 1 : -1].float()
    logits[..., model.config.block_diffusion["mask_token_id"]] = float("-inf")  # the sampler never emits it
    ar = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    lengths = (out["completion_ids"] != tok.pad_token_id).sum(1)
    for r in range(ids.shape[0]):
        n = int(lengths[r])
        torch.testing.assert_close(logps[r, :n], ar[r, :n], atol=1e-5, rtol=0)
    assert int(lengths.sum()) >= 8


@pytest.mark.parametrize("estimator,extra", [("mean_field", {"prompt_mask_prob": 0.3}), ("elbo", {"elbo_samples": 3})])
def test_stochastic_estimators_share_randomness_between_old_and_new(tmp_path, estimator, extra):
    """num_iterations > 1: old log-probs (generation time) and new ones (loss time) use the same per-rollout seeds,
    so at equal weights the ratio is exactly 1; other seeds give other numbers (the estimator is stochastic)."""
    model, tok = _model()
    ds = _prompts()
    trainer = DiffusionGRPOTrainer(model, reward_funcs=sort_reward, processing_class=tok, train_dataset=ds,
                                   args=_config(tmp_path, likelihood_estimator=estimator, num_iterations=2, **extra))
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    mask = out["completion_ids"] != tok.pad_token_id  # (completion_mask may be zeroed: zero-variance groups)
    new = _trainer_logps(trainer, out)
    assert torch.equal(new[mask], out["old_per_token_logps"][mask])
    other = _trainer_logps(trainer, {**out, "estimator_seeds": out["estimator_seeds"] + 1})
    assert not torch.allclose(other[mask], new[mask])


@pytest.fixture(scope="module")
def weak_sort_model_dir(tmp_path_factory) -> str:
    """A converted tiny Qwen3 CFT-trained for 40 steps only: valid format, imperfect sorting, room for RL."""
    path = str(tmp_path_factory.mktemp("sort-cft-weak"))
    train_sort_cft(path, max_steps=40)
    return path


def _sampled_sort_reward(model, tok, temperature: float = 1.0) -> float:
    ev = sort_dataset(64, seed=123)
    ids, mask = left_pad([tok(p)["input_ids"] for p in ev["prompt"]], tok.pad_token_id)
    was_training = model.training
    model.eval()
    out = BlockDiffusionSampler(model).generate(ids, mask, max_completion_length=12, tau=0.9, temperature=temperature,
                                                generator=torch.Generator().manual_seed(0))
    model.train(was_training)
    texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
    return statistics.mean(sort_reward(None, texts, ev["target"]))


@pytest.mark.parametrize("estimator", ["trajectory_replay", "mean_field"])
def test_training_raises_sort_reward(tmp_path, weak_sort_model_dir, estimator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weak_sort_model_dir)
    model = AutoModelForCausalLM.from_pretrained(weak_sort_model_dir)
    before = _sampled_sort_reward(model, tok)
    args = _config(tmp_path, max_steps=60, per_device_train_batch_size=32, num_generations=8, learning_rate=5e-4,
                   temperature=1.0, likelihood_estimator=estimator)
    trainer = DiffusionGRPOTrainer(model, reward_funcs=sort_reward, processing_class=tok, args=args,
                                   train_dataset=sort_dataset(2000, seed=1).remove_columns(["completion", "answer_start"]))
    trainer.train()
    after = _sampled_sort_reward(trainer.model, tok)
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert after > before + 0.04, (before, after)
    assert statistics.mean(logged[-10:]) > statistics.mean(logged[:10]), logged
    history = {k for h in trainer.state.log_history for k in h}
    assert {"likelihood/forward_passes_per_sample", "rollout/tokens_per_forward", "frac_reward_zero_std"} <= history


SIDS = [f"<a_{i}><b_{i}><c_{i}><d_{i}>" for i in range(4)]


def test_runs_with_rerank_reward_as_trl_calls_it(tmp_path):
    """gr2_reward on a re-ranking-shaped dataset: dataset columns arrive as per-completion keyword lists, invalid
    rankings get the penalty and stay in their group, all-invalid groups are dropped from the loss."""
    from diffgr2_trl.rewards.rerank import gr2_reward, validity

    model, tok = _model()
    calls: list[dict] = []

    def spy(prompts, completions, **kwargs):
        calls.append(kwargs)
        return gr2_reward(prompts=prompts, completions=completions, **kwargs)

    spy.__name__ = "gr2_reward"
    rows = [{"prompt": f"sort {i} {i + 1} :", "candidates": SIDS, "target": SIDS[i % 4]} for i in range(8)]
    trainer = DiffusionGRPOTrainer(model, reward_funcs=[spy, sort_reward], processing_class=tok,
                                   train_dataset=Dataset.from_list([{**r, "target": r["target"]} for r in rows]),
                                   validity_fn=validity, args=_config(tmp_path, reward_weights=[1.0, 0.5]))
    trainer.train()
    kw = calls[0]
    assert kw["candidates"] == [SIDS] * 8 and len(kw["target"]) == 8 and "trainer_state" in kw
    assert len(set(kw["target"][:4])) == 1  # one prompt's 4 generations are consecutive: a group
    logs = {k: v for h in trainer.state.log_history for k, v in h.items()}
    # The random model writes no valid ranking: every rollout is invalid, gets exactly -1 in total, and no group
    # has reward variance, so nothing reaches the loss.
    assert logs["invalid_frac"] == 1.0 and logs["reward"] == pytest.approx(-1.0)
    assert logs["frac_reward_zero_std"] == 1.0 and logs["loss"] == 0.0


def test_zero_std_groups_are_dropped_from_the_loss_mask(tmp_path):
    model, tok = _model()
    ds = _prompts()
    calls = {"n": 0}

    def constant_for_first_group(prompts, completions, **kwargs):
        calls["n"] += 1
        return [1.0] * 4 + [float(i) for i in range(len(completions) - 4)]

    trainer = DiffusionGRPOTrainer(model, reward_funcs=constant_for_first_group, processing_class=tok,
                                   train_dataset=ds, args=_config(tmp_path))
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    lengths = torch.tensor([len(x) for x in out["completion_ids"].tolist()])
    assert out["completion_mask"][:4].sum() == 0 and out["completion_mask"][4:].sum() > 0
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert lengths.numel() == 8


def test_lora_trains_adapter_only_and_replay_stays_exact(tmp_path):
    from peft import LoraConfig

    model, tok = _model()
    ds = _prompts()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DiffusionGRPOTrainer(
        model, reward_funcs=length_reward, processing_class=tok, train_dataset=ds,
        args=_config(tmp_path, max_steps=2, learning_rate=1e-2),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)
    base = trainer.model.get_base_model()
    for k, v in base.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base_before[k.replace(".base_layer", "")]), k
    seen = _spy_sampler_logprobs(trainer)
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    logps = _trainer_logps(trainer, out)
    for r, lp in enumerate(seen["logprobs"]):
        torch.testing.assert_close(logps[r, : len(lp)], torch.tensor(lp), atol=1e-5, rtol=0)


def test_rollouts_are_sampled_in_eval_mode_under_lora_dropout(tmp_path):
    """With LoRA dropout a train-mode rollout samples from a perturbed policy that no replay reproduces: the rollout
    runs in eval mode (and the trainer's mode is restored after), so at step 0 the sampler's log-probs are the
    trainer's eval-mode replay."""
    from peft import LoraConfig

    model, tok = _model()
    ds = _prompts()
    trainer = DiffusionGRPOTrainer(
        model, reward_funcs=length_reward, processing_class=tok, train_dataset=ds,
        args=_config(tmp_path, temperature=1.0),
        # init_lora_weights=False: a non-zero lora_B, so the dropout in front of the adapter changes the outputs.
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
                               init_lora_weights=False),
    )
    seen = _spy_sampler_logprobs(trainer)
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    dropouts = [m for n, m in trainer.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and trainer.model.training and all(m.training for m in dropouts)  # the mode is back
    trainer.model.eval()
    logps = _trainer_logps(trainer, out)
    for r, lp in enumerate(seen["logprobs"]):
        torch.testing.assert_close(logps[r, : len(lp)], torch.tensor(lp), atol=1e-5, rtol=0)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    """A run resumed from checkpoint-2 ends at the uninterrupted run's weights: TRL's step, optimizer, scheduler and
    RNG state are restored, and the rollout buffer is regenerated on resume."""
    ds = _prompts()

    def run(out, resume=None):
        model, tok = _model()
        args = _config(tmp_path / out, max_steps=3, save_strategy="steps", save_steps=1, learning_rate=1e-2,
                       temperature=1.0)
        trainer = DiffusionGRPOTrainer(model, reward_funcs=length_reward, processing_class=tok, train_dataset=ds,
                                       args=args)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("a")
    resumed = run("b", resume=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert any(h.get("grad_norm", 0) > 0 for h in resumed.state.log_history)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


# ------------------------------------------------------------------------------------------------------ bad input
def test_reward_of_wrong_length_or_type_fails_clearly(tmp_path):
    model, tok = _model()
    ds = _prompts()

    def too_short(prompts, completions, **kw):
        return [1.0]

    def not_numbers(prompts, completions, **kw):
        return ["good"] * len(completions)

    def with_none(prompts, completions, **kw):
        return [None] + [0.5] * (len(completions) - 1)

    for func, err, match in [(too_short, ValueError, "'too_short' returned 1 rewards for 8"),
                             (not_numbers, TypeError, "'not_numbers' returned 'good'")]:
        trainer = DiffusionGRPOTrainer(model, reward_funcs=func, processing_class=tok, train_dataset=ds,
                                       args=_config(tmp_path))
        with pytest.raises(err, match=match):
            trainer.train()
    trainer = DiffusionGRPOTrainer(model, reward_funcs=with_none, processing_class=tok, train_dataset=ds,
                                   args=_config(tmp_path))
    trainer.train()  # None means "not applicable": allowed


def test_stock_trl_reward_and_validity_returns_run_unchanged(tmp_path):
    """What TRL's own _calculate_rewards accepts (it builds a float32 tensor) runs here too: bool, int, float, numpy
    scalars and 0-d tensors, None for 'not applicable' (NaN); the validity function gets TRL's reward keywords."""
    model, tok = _model()
    trainer = DiffusionGRPOTrainer(model, processing_class=tok, train_dataset=_prompts(), args=_config(tmp_path),
                                   reward_funcs=[lambda prompts, completions, **kw: [
                                       True, 2, 0.5, np.bool_(True), np.float32(1.5), torch.tensor(3.0), None,
                                       torch.tensor(False)]],
                                   validity_fn=(validity := _recording_validity()))
    n = 8
    inputs = [{"prompt": "sort 1 2 :", "target": str(i)} for i in range(n)]
    rewards = trainer._calculate_rewards(inputs, ["p"] * n, ["c"] * n, [[1]] * n)
    expected = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5, 3.0, float("nan"), 0.0])
    # _recording_validity: False, 0 are invalid; None and NaN are not applicable (valid); True, 1, 2.0 are valid.
    invalid = torch.tensor([False, True, True, False, False, False, False, False])
    expected[invalid] = trainer.args.invalid_penalty
    torch.testing.assert_close(rewards[:, 0], expected, equal_nan=True)
    kw = validity.kwargs
    assert {"completion_ids", "trainer_state", "log_extra", "log_metric", "target"} <= set(kw)
    assert kw["target"] == [str(i) for i in range(n)] and kw["trainer_state"] is trainer.state
    assert trainer._pending_metrics["validity_calls"] == [1.0]  # log_metric is TRL's own, live


def _recording_validity():
    def validity(prompts, completions, completion_ids, log_metric, **kwargs):
        validity.kwargs = {"completion_ids": completion_ids, "log_metric": log_metric, **kwargs}
        log_metric("validity_calls", 1.0)
        return [True, np.bool_(False), torch.tensor(0), None, 1, float("nan"), torch.tensor(True), 2.0]

    return validity


def test_reward_returns_trl_would_refuse_fail_clearly(tmp_path):
    model, tok = _model()
    trainer = DiffusionGRPOTrainer(model, processing_class=tok, train_dataset=_prompts(), args=_config(tmp_path),
                                   reward_funcs=[lambda prompts, completions, **kw: [torch.ones(2)] * 8])
    inputs = [{"prompt": "sort 1 2 :"}] * 8
    with pytest.raises(TypeError, match=r"'<lambda>' returned tensor\(\[1., 1.\]\) .* for completion 0"):
        trainer._calculate_rewards(inputs, ["p"] * 8, ["c"] * 8, [[1]] * 8)


    async def async_validity(prompts, completions, **kw):
        return [True] * len(completions)

    with pytest.raises(TypeError, match="validity_fn must be a plain"):
        DiffusionGRPOTrainer(model, processing_class=tok, train_dataset=_prompts(), args=_config(tmp_path),
                             reward_funcs=length_reward, validity_fn=async_validity)


def test_config_and_model_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown likelihood estimator 'exact'"):
        _config(tmp_path, likelihood_estimator="exact")
    with pytest.raises(ValueError, match="divisible by num_generations"):
        _config(tmp_path, per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="temperature and top_k only"):
        _config(tmp_path, top_p=0.9)
    tok = sort_tokenizer()
    plain = build_model("qwen3", tokenizer=tok, shape=SMALL_SHAPE, seed=0)
    with pytest.raises(ValueError, match="not converted to block diffusion"):
        DiffusionGRPOTrainer(plain, reward_funcs=sort_reward, processing_class=tok, train_dataset=_prompts(),
                             args=_config(tmp_path))


def test_grpo_cli_with_rerank_reward_path(tmp_path, monkeypatch):
    """``diffgr2 grpo`` resolves dotted reward paths like ``trl grpo`` and trains from a data file."""
    import json

    from diffgr2_trl.cli import main

    model, tok = _model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort {i} 3 :", "candidates": SIDS, "target": SIDS[i % 4]}) + "\n"
                            for i in range(8)))
    monkeypatch.chdir(tmp_path.parent)  # reward paths resolve from the repository root in real use
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    out = tmp_path / "out"
    rc = main(["grpo", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(data), "--output_dir", str(out),
               "--reward_funcs", "diffgr2_trl.rewards.rerank.gr2_reward", "diffgr2_trl.synthetic.sort_reward",
               "--validity_func", "diffgr2_trl.rewards.rerank.validity", "--max_steps", "1", "--per_device_train_batch_size", "8",
               "--num_generations", "4", "--max_completion_length", "8", "--use_cpu", "--bf16", "false",
               "--report_to", "none", "--save_strategy", "no", "--likelihood_estimator", "elbo"])
    assert rc == 0
    history = json.loads((out / "log_history.json").read_text())
    assert "rewards/gr2_reward/mean" in history[0] and history[0]["invalid_frac"] == 1.0
    assert (out / "config.json").exists()
    with pytest.raises(ValueError, match="no function 'nope'"):
        main(["grpo", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(data), "--output_dir", str(out),
              "--reward_funcs", "diffgr2_trl.rewards.rerank.nope", "--use_cpu", "--bf16", "false"])


def test_qlora_trains_the_adapter_on_a_4bit_model(tmp_path):
    """LoRA on a 4-bit nf4 policy (bitsandbytes, CPU): two steps update the adapter; log-probs stay finite."""
    from peft import LoraConfig

    from tests.helpers import is_4bit, quantized_sort_student

    model, tok = quantized_sort_student(tmp_path / "base")
    trainer = DiffusionGRPOTrainer(
        model, reward_funcs=length_reward, processing_class=tok, train_dataset=_prompts(),
        args=_config(tmp_path, max_steps=2, learning_rate=1e-2, temperature=1.0),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert is_4bit(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)


def test_custom_sampler_is_the_one_used(tmp_path):
    """A sampler passed in decodes every rollout (handed the current policy); the default one is built from the
    config's decoding fields."""
    from diffgr2_trl.block_diffusion import BlockDecodingConfig

    class CountingSampler(BlockDiffusionSampler):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.models = []

        def generate(self, input_ids, attention_mask=None, *, model=None, **kw):
            self.models.append(model)
            return super().generate(input_ids, attention_mask, model=model, **kw)

    model, tok = _model()
    sampler = CountingSampler(config=BlockDecodingConfig(max_completion_length=12, tau=0.5, temperature=1.0),
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    trainer = DiffusionGRPOTrainer(model, reward_funcs=length_reward, processing_class=tok, train_dataset=_prompts(),
                                   args=_config(tmp_path, max_steps=2), sampler=sampler)
    assert trainer.sampler is sampler
    trainer.train()
    assert len(sampler.models) == 2 and all(m is not None for m in sampler.models)
    default = DiffusionGRPOTrainer(model, reward_funcs=length_reward, processing_class=tok, train_dataset=_prompts(),
                                   args=_config(tmp_path, tau=0.7, top_k=0, temperature=0.5)).sampler
    assert default.config == BlockDecodingConfig(max_completion_length=12, tau=0.7, temperature=0.5, top_k=None)
    with pytest.raises(ValueError, match="tokens_per_step must be a positive integer"):
        _config(tmp_path, tokens_per_step=0)


def test_rollout_hand_off_follows_trls_call_order(tmp_path):
    """The installed TRL calls the hooks in the order the rollout hand-off relies on: each log-prob request comes
    after the rollout it scores was recorded (the old log-probs inside _generate_and_score_completions, the policy's
    inside _compute_loss), and nothing is left recorded between steps."""
    model, tok = _model()
    trainer = DiffusionGRPOTrainer(model, reward_funcs=length_reward, processing_class=tok,
                                   args=_config(tmp_path, max_steps=2, num_iterations=2),
                                   train_dataset=_prompts())
    calls: list[tuple[str, bool]] = []

    def spy(name):
        original = getattr(trainer, name)

        def wrapped(*args, **kwargs):
            calls.append((name, trainer._rollout_ctx is not None))
            try:
                return original(*args, **kwargs)
            finally:
                calls.append((f"/{name}", trainer._rollout_ctx is not None))

        setattr(trainer, name, wrapped)

    for name in ("_generate_and_score_completions", "_generate_single_turn", "_compute_loss",
                 "_get_per_token_logps_and_entropies"):
        spy(name)
    trainer.train()
    logps = [i for i, (n, _) in enumerate(calls) if n == "_get_per_token_logps_and_entropies"]
    assert logps and all(calls[i][1] for i in logps), calls  # every request found its rollout
    names = [n for n, _ in calls]
    first_gen = names.index("_generate_and_score_completions")
    inside = names[first_gen: names.index("/_generate_and_score_completions")]
    assert inside.index("/_generate_single_turn") < inside.index("_get_per_token_logps_and_entropies")  # old/ref
    assert inside.count("_get_per_token_logps_and_entropies") >= 1  # num_iterations=2: the old log-probs
    loss = names.index("_compute_loss")
    assert "_get_per_token_logps_and_entropies" in names[loss: names.index("/_compute_loss")]
    assert all(not active for n, active in calls if n in ("/_generate_and_score_completions", "/_compute_loss"))


def test_likelihood_recompute_is_refused_for_other_estimators(tmp_path):
    with pytest.raises(ValueError, match="likelihood_recompute"):
        _config(tmp_path, likelihood_recompute=True, likelihood_estimator="mean_field")
