"""The core ``diffgr2`` subcommands, run through the real entry point."""

import json

import pytest
from transformers import AutoConfig

from diffgr2_trl.cli import main
from diffgr2_trl.modeling import build_model, build_word_tokenizer
from tests.helpers import WORDS


@pytest.fixture
def ar_model_dir(tmp_path):
    tok = build_word_tokenizer(WORDS)
    build_model("qwen3", tokenizer=tok).save_pretrained(tmp_path / "ar")
    tok.save_pretrained(tmp_path / "ar")
    return str(tmp_path / "ar")


def test_convert_then_generate(ar_model_dir, tmp_path, capsys):
    out = str(tmp_path / "bd")
    assert main(["convert", "--model", ar_model_dir, "--output", out, "--block-size", "8"]) == 0
    assert AutoConfig.from_pretrained(out).block_diffusion["block_size"] == 8
    assert main(["generate", "--model", out, "--prompt", "sort 3 1 2 :", "--tau", "0.9", "--max_new_tokens", "8"]) == 0
    assert "tokens/forward" in capsys.readouterr().out


def test_bad_arguments_and_config_keys(ar_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="block_size must be a positive integer"):
        main(["convert", "--model", ar_model_dir, "--output", str(tmp_path / "x"), "--block-size", "0"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {ar_model_dir}\noutput: {tmp_path / 'y'}\nblock_sizee: 8\n")
    with pytest.raises(ValueError, match="block_sizee is not an option of diffgr2 convert; did you mean 'block_size'"):
        main(["convert", "--config", str(cfg)])
    assert main(["nope"]) == 2


def test_cft_cli_trains_from_an_ar_checkpoint(tmp_path):
    from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer

    tok = sort_tokenizer()
    build_model("qwen3", tokenizer=tok).save_pretrained(tmp_path / "ar")
    tok.save_pretrained(tmp_path / "ar")
    sort_dataset(16).to_json(tmp_path / "train.jsonl")
    cfg = tmp_path / "cft.yaml"
    cfg.write_text("max_steps: 2\nper_device_train_batch_size: 4\nuse_cpu: true\nbf16: false\nreport_to: []\n"
                   "answer_weight: 2.0\ndisable_tqdm: true\n")
    assert main(["cft", "--config", str(cfg), "--model_name_or_path", str(tmp_path / "ar"),
                 "--dataset_name", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
                 "--block_size", "4"]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out").block_diffusion["block_size"] == 4


def test_bench_commands_write_json(tmp_path):
    path = tmp_path / "d.json"
    assert main(["bench-decode", "--shape", "tiny", "--vocab_size", "64", "--batch_sizes", "1", "2",
                 "--block_sizes", "4", "--taus", "0.9", "--new_tokens", "8", "--prompt_len", "8", "--repeats", "1",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["method"] for r in rows} == {"ar", "block_diffusion"} and len(rows) == 6
    fixed = [r for r in rows if r.get("tokens_per_step") == 4]
    assert all(r["forward_passes"] == 2 and r["tokens_per_forward"] == 4.0 for r in fixed)
    assert all({"method", "block_size", "batch_size", "tokens_per_s", "forward_passes", "speedup_vs_ar"} <= set(r) for r in rows)
    path = tmp_path / "t.json"
    assert main(["bench-train", "--shape", "tiny", "--vocab_size", "64", "--batch_size", "2", "--prompt_len", "8",
                 "--completion_len", "8", "--block_size", "4", "--repeats", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["cft_over_sft"] > 0


def test_console_errors_are_one_line_with_a_debug_escape(tmp_path, capsys, monkeypatch):
    from diffgr2_trl.cli import console_main

    empty = tmp_path / "empty"
    empty.mkdir()
    for model, expected in ((empty, "no model here (no config.json"), (tmp_path / "nope", "no such directory")):
        assert console_main(["evaluate", "--model", str(model), "--prepared", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert console_main(["cft", "--model_name_or_path", str(empty), "--dataset_name", str(tmp_path),
                         "--output_dir", str(tmp_path / "o")]) == 2
    assert "no model here" in capsys.readouterr().err
    # bad values are refused before any model loads (the model path here does not even exist)
    assert console_main(["evaluate", "--model", str(tmp_path / "nope"), "--prepared", str(tmp_path), "--tau", "2"]) == 2
    assert "--tau must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no such directory"):  # --debug: the exception itself, traceback and all
        console_main(["evaluate", "--model", str(tmp_path / "nope"), "--prepared", str(tmp_path), "--debug"])
    monkeypatch.setenv("DIFFGR2_DEBUG", "1")
    with pytest.raises(ValueError):
        console_main(["evaluate", "--model", str(tmp_path / "nope"), "--prepared", str(tmp_path)])
