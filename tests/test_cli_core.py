"""The core ``diffgr2`` subcommands, run through the real entry point."""

import inspect
import json
import os

import pytest
from transformers import AutoConfig

from diffgr2_trl.block_diffusion import BlockDecodingConfig
from diffgr2_trl.cli import main
from diffgr2_trl.errors import OptionError
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
    assert main(["convert", "--model_name_or_path", ar_model_dir, "--output_dir", out, "--block-size", "8"]) == 0
    assert AutoConfig.from_pretrained(out).block_diffusion["block_size"] == 8
    assert main(["generate", "--model_name_or_path", out, "--prompt", "sort 3 1 2 :", "--tau", "0.9",
                 "--max_completion_length", "8"]) == 0
    assert "tokens/forward" in capsys.readouterr().out


def test_bad_arguments_and_config_keys(ar_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="block_size must be a positive integer"):
        main(["convert", "--model_name_or_path", ar_model_dir, "--output_dir", str(tmp_path / "x"), "--block-size", "0"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {ar_model_dir}\noutput_dir: {tmp_path / 'y'}\nblock_sizee: 8\n")
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
    # row accounting: a fixed schedule fills every row's block in step, so no row-forward is wasted; AR: one per token
    assert all(r["row_forwards"] == 2 * r["batch_size"] and r["tokens_per_row_forward"] == 4.0
               and r["row_tokens_per_forward"] == 4.0 for r in fixed)
    assert all(r["row_forwards"] == 8 * r["batch_size"] for r in rows if r["method"] == "ar")
    path = tmp_path / "t.json"
    assert main(["bench-train", "--shape", "tiny", "--vocab_size", "64", "--batch_size", "2", "--prompt_len", "8",
                 "--completion_len", "8", "--block_size", "4", "--repeats", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["cft_over_sft"] > 0


def test_console_errors_are_one_line_with_a_debug_escape(tmp_path, capsys, monkeypatch):
    from diffgr2_trl.cli import console_main

    empty = tmp_path / "empty"
    empty.mkdir()
    for model, expected in ((empty, "no model here (no config.json"), (tmp_path / "nope", "no such file or directory")):
        assert console_main(["evaluate", "--model_name_or_path", str(model), "--dataset_name", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert console_main(["cft", "--model_name_or_path", str(empty), "--dataset_name", str(tmp_path),
                         "--output_dir", str(tmp_path / "o")]) == 2
    assert "no model here" in capsys.readouterr().err
    # bad values are refused before any model loads (the model directory here holds no model)
    assert console_main(["evaluate", "--model_name_or_path", str(empty), "--dataset_name", str(tmp_path),
                         "--tau", "2"]) == 2
    assert "--tau must be in (0, 1]" in capsys.readouterr().err
    # a trainer config's check too: the error carries its field (OptionError), nothing is read from its text
    assert console_main(["cft", "--model_name_or_path", str(empty), "--dataset_name", str(tmp_path),
                         "--output_dir", str(tmp_path / "o"), "--block_size", "0"]) == 2
    assert "error: --block_size must be a positive integer, got 0." in capsys.readouterr().err
    with pytest.raises(OptionError, match=r"^tau must be in \(0, 1\]") as raised:  # Python API: the field's name
        BlockDecodingConfig(tau=2.0)
    assert raised.value.option == "tau" and isinstance(raised.value, ValueError)
    with pytest.raises(ValueError, match="no such file or directory"):  # --debug: the exception itself, traceback and all
        console_main(["evaluate", "--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", str(tmp_path),
                      "--debug"])
    monkeypatch.setenv("DIFFGR2_DEBUG", "1")
    with pytest.raises(ValueError):
        console_main(["evaluate", "--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", str(tmp_path)])


def test_deprecated_spellings_still_work_with_a_future_warning(ar_model_dir, tmp_path, capsys):
    """--model/--output/--max_new_tokens (command line and --config keys) keep working for one release, warned."""
    out = str(tmp_path / "bd")
    with pytest.warns(FutureWarning) as seen:
        assert main(["convert", "--model", ar_model_dir, "--output", out, "--block_size", "8"]) == 0
    messages = [str(w.message) for w in seen]
    assert any("--model is deprecated; use --model_name_or_path" in m for m in messages)
    assert any("--output is deprecated; use --output_dir" in m for m in messages)
    assert AutoConfig.from_pretrained(out).block_diffusion["block_size"] == 8
    with pytest.warns(FutureWarning, match="--max_new_tokens is deprecated; use --max_completion_length"):
        assert main(["generate", "--model_name_or_path", out, "--prompt", "sort 3 1 2 :", "--max_new_tokens=4"]) == 0
    assert "[4 tokens" in capsys.readouterr().out  # the old spelling still sets the cap
    cfg = tmp_path / "old.yaml"
    cfg.write_text(f"model: {ar_model_dir}\noutput: {tmp_path / 'bd2'}\nblock_size: 4\n")
    with pytest.warns(FutureWarning) as seen:
        assert main(["convert", "--config", str(cfg)]) == 0
    assert sum("is deprecated" in str(w.message) for w in seen) == 2
    assert AutoConfig.from_pretrained(tmp_path / "bd2").block_diffusion["block_size"] == 4


def test_every_subcommand_parses_with_trl_and_the_shared_names():
    """parse() of each subcommand: TrlParser dataclasses, the shared option names, new names win over old ones."""
    import importlib
    import warnings

    from diffgr2_trl.block_diffusion import BlockDecodingConfig
    from diffgr2_trl.cli import COMMANDS
    from diffgr2_trl.commands._args import DEPRECATED_OPTIONS

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), name
        assert callable(getattr(mod, "parse", None)) and callable(getattr(mod, "run", None)), name
    for command, renames in DEPRECATED_OPTIONS.items():
        assert command in COMMANDS
        assert set(renames.values()) <= {"model_name_or_path", "dataset_name", "output_dir", "max_completion_length",
                                         "teacher", "dataset_train_split", "dataset_test_split"}
    from diffgr2_trl.commands import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names emit nothing
        args, decoding = evaluate.parse(["--model_name_or_path", "m", "--dataset_name", "d", "--tau", "0.5"])
    assert isinstance(decoding, BlockDecodingConfig) and decoding.tau == 0.5
    assert decoding.max_completion_length == 256  # evaluate's own default
    with pytest.warns(FutureWarning):
        args, decoding = evaluate.parse(["--model_name_or_path", "m", "--dataset_name", "d"],
                                        values={"max_new_tokens": 7, "max_completion_length": 9})
    assert decoding.max_completion_length == 9  # both given: the new name wins


def test_threads_has_one_meaning(monkeypatch):
    import torch

    from diffgr2_trl.utils import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        set_threads(0)
        assert torch.get_num_threads() == before
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_decode_compiled_rows_and_flex_loss_check(tmp_path):
    path = tmp_path / "d.json"
    # backend "eager" traces the compiled paths with dynamo without building C++ kernels (a GPU uses inductor + graphs)
    assert main(["bench-decode", "--shape", "tiny", "--vocab_size", "64", "--batch_sizes", "2", "--block_sizes", "4",
                 "--taus", "0.9", "--new_tokens", "8", "--prompt_len", "8", "--repeats", "1", "--compile",
                 "--compile_backend", "eager", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["method"] for r in rows} == {"ar", "ar_compiled", "block_diffusion", "block_diffusion_compiled"}
    best_ar = max(r["tokens_per_s"] for r in rows if r["method"].startswith("ar"))
    for r in rows:  # speedups are against the faster AR row
        assert abs(r["speedup_vs_ar"] - r["tokens_per_s"] / best_ar) < 1e-9
    fixed = [r for r in rows if r.get("tokens_per_step") == 4]
    assert all(r["forward_passes"] == 2 for r in fixed)  # the compiled sampler commits exactly like the eager one

    from diffgr2_trl.bench.train import compare_attention_losses
    from diffgr2_trl.block_diffusion import BlockDiffusionSpec
    from diffgr2_trl.modeling import build_model
    from tests.helpers import random_batch

    # The GPU check compares flex_attention with sdpa; here eager vs sdpa (CPU flex kernels are not the product's
    # path: torch has no flex backward on CPU, and its first CPU forward was seen returning NaN with 2 threads).
    ids, am, cm = random_batch(2, 16, 8)
    eager = build_model("qwen3", vocab_size=64, shape="tiny", attn_implementation="eager")
    losses = compare_attention_losses(eager, ids, am, cm, BlockDiffusionSpec(block_size=4, mask_token_id=63))
    assert abs(losses["cft_loss_eager_minus_sdpa"]) < 1e-5 and losses["cft_loss_eager"] > 0
    assert eager.config._attn_implementation == "eager"  # restored
    with pytest.raises(ValueError, match="needs a GPU"):
        main(["bench-train", "--shape", "tiny", "--attn_implementation", "flex_attention", "--device", "cpu"])


def test_one_teacher_flag_and_one_form_of_use_cpu():
    """opd: --teacher is the flag; the config field's and TRL's spellings are deprecated aliases of it. train-ar's
    --use_cpu is a bare flag like the trainers' (it took a value before)."""
    from diffgr2_trl.commands import opd, train_ar

    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    for old in ("--teacher_model", "--teacher_model_name_or_path"):
        with pytest.warns(FutureWarning, match=f"{old} is deprecated; use --teacher"):
            script, args, _ = opd.parse([*base, old, "http://127.0.0.1:1"])
        assert script.teacher == "http://127.0.0.1:1" and args.teacher_model_name_or_path is None
    (ar_args,) = train_ar.parse(["--dataset_name", "d", "--output_dir", "o", "--use_cpu"])
    assert ar_args.use_cpu is True


def test_the_decode_summary_labels_constrained_rows():
    from diffgr2_trl.pipeline.runner import summary_line

    rows = [{"method": "ar", "tau": None, "tokens_per_s": 400.0, "constrained": False},
            {"method": "ar", "tau": None, "tokens_per_s": 300.0, "constrained": True},
            {"method": "block", "tau": 0.9, "tokens_per_s": 500.0, "constrained": True}]
    assert summary_line("decode", {"rows": rows}) == ("ar: 400.0 tok/s | ar, constrained: 300.0 tok/s | "
                                                     "block tau=0.9, constrained: 500.0 tok/s")


def test_library_progress_bars_are_off_unless_verbose(monkeypatch, capsys):
    from diffgr2_trl.cli import QUIET_ENV, console_main

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    assert console_main(["convert", "--help", "--verbose"]) == 0
    assert not any(key in os.environ for key in QUIET_ENV)
    assert console_main(["convert", "--help"]) == 0
    assert all(os.environ[key] == "1" for key in QUIET_ENV)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")  # the user's own switch wins
    assert console_main(["convert", "--help"]) == 0
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "0"


def test_one_script_arguments_convention_for_the_splits():
    """cft, opd and grpo name their splits as TRL does (--dataset_train_split, --dataset_test_split); opd's and grpo's
    old spellings still work for a release, warned."""
    from diffgr2_trl.commands import cft, grpo, opd

    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    assert cft.parse([*base, "--dataset_train_split", "x"])[0].dataset_train_split == "x"
    assert opd.parse([*base, "--dataset_train_split", "x", "--dataset_test_split", "y"])[0].dataset_test_split == "y"
    assert grpo.parse([*base, "--dataset_train_split", "x"])[0].dataset_train_split == "x"
    with pytest.warns(FutureWarning, match="--dataset_split is deprecated; use --dataset_train_split"):
        assert grpo.parse([*base, "--dataset_split", "z"])[0].dataset_train_split == "z"
    with pytest.warns(FutureWarning, match="--eval_split is deprecated; use --dataset_test_split"):
        assert opd.parse([*base, "--eval_split", "v"])[0].dataset_test_split == "v"


@pytest.mark.parametrize(("command", "required"), [
    ("cft", []), ("opd", []), ("grpo", []), ("generate", ["--model_name_or_path", "m", "--prompt", "p"]),
    ("convert", ["--model_name_or_path", "m", "--output_dir", "o", "--block_size", "4"]), ("bench-teacher", []),
])
def test_threads_is_accepted_by_every_subcommand(command, required, monkeypatch):
    """``--threads N`` sets torch's threads in every subcommand, also those whose dataclasses have no ``threads``
    field (they get :class:`SharedOptions`, which ``run`` never sees)."""
    import importlib

    import torch

    from diffgr2_trl.cli import COMMANDS
    from diffgr2_trl.commands._args import SharedOptions

    module = importlib.import_module(COMMANDS[command][0])
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        parsed = module.parse([*required, "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert not any(isinstance(p, SharedOptions) for p in parsed)
    assert len(parsed) == len(inspect.signature(module.run).parameters)
