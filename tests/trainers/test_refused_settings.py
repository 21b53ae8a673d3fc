"""TRL settings the trainers and subcommands cannot honour are refused with an error naming them; those they can
(model revision, trust_remote_code, dataset configuration and test split) reach the loaders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffgr2_trl.errors import OptionError
from diffgr2_trl.trainers import BlockDiffusionConfig, DiffusionGRPOConfig, OnPolicyDistillationConfig

CPU = dict(use_cpu=True, bf16=False, report_to=[])


@pytest.mark.parametrize("config", [DiffusionGRPOConfig, OnPolicyDistillationConfig])
@pytest.mark.parametrize(("name", "value"), [("generation_kwargs", {"do_sample": False}),
                                             ("cache_implementation", "static")])
def test_rollout_configs_refuse_trl_generation_settings(config, name, value, tmp_path):
    extra = {"num_generations": 2, "per_device_train_batch_size": 2} if config is DiffusionGRPOConfig else {}
    with pytest.raises(OptionError, match=rf"^{name} is not used by the block-diffusion sampler"):
        config(str(tmp_path), **CPU, **extra, **{name: value})
    config(str(tmp_path), **CPU, **extra)  # the defaults pass


def test_opd_refuses_pad_to_multiple_of(tmp_path):
    with pytest.raises(OptionError, match="^pad_to_multiple_of is not used"):
        OnPolicyDistillationConfig(str(tmp_path), **CPU, pad_to_multiple_of=8)


def test_cft_refuses_other_sft_loss_types(tmp_path):
    with pytest.raises(OptionError, match="^loss_type must be 'nll'.*got 'dft'"):
        BlockDiffusionConfig(str(tmp_path), **CPU, loss_type="dft")


def test_model_revision_and_trust_remote_code_reach_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig

    from diffgr2_trl.commands import _common

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.setdefault("model", kw))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: seen.setdefault("tokenizer", kw))
    _common.load_for_training("org/model", ModelConfig(model_revision="v2"), trust_remote_code=True)
    for what in ("model", "tokenizer"):
        assert seen[what]["revision"] == "v2" and seen[what]["trust_remote_code"] is True, (what, seen[what])


def _script(path, **kw):
    base = dict(dataset_name=str(path), dataset_config=None, dataset_train_split="train", dataset_test_split="test",
                dataset_streaming=False)
    return SimpleNamespace(**{**base, **kw})


def test_cft_datasets_honour_the_test_split_and_refuse_what_they_cannot(tmp_path):
    from datasets import Dataset, DatasetDict

    from diffgr2_trl.commands._common import load_script_datasets

    rows = [{"prompt": "sort 2 1 : ", "completion": "answer 1 2"}]
    DatasetDict(train=Dataset.from_list(rows * 3), test=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "d"))
    train, evaluation = load_script_datasets("cft", _script(tmp_path / "d"), SimpleNamespace(eval_strategy="steps"))
    assert (len(train), len(evaluation)) == (3, 1)
    _, evaluation = load_script_datasets("cft", _script(tmp_path / "d"), SimpleNamespace(eval_strategy="no"))
    assert evaluation is None
    with pytest.raises(OptionError, match="^dataset_streaming is not supported by diffgr2 cft"):
        load_script_datasets("cft", _script(tmp_path / "d", dataset_streaming=True), SimpleNamespace(eval_strategy="no"))
    with pytest.raises(OptionError, match="^dataset_config names a configuration of a hub dataset"):
        load_script_datasets("cft", _script(tmp_path / "d", dataset_config="en"), SimpleNamespace(eval_strategy="no"))
