"""End to end through ``diffgr2_trl.cli.main``: prepare (tiny synthetic dataset), train-ar, evaluate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import load_from_disk

from diffgr2_trl.cli import main
from diffgr2_trl.rerank.data import locate_data_dir
from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.pipeline_data import COLUMNS, build_rows, match_target_positions
from diffgr2_trl.rerank.prompts import RECOMMENDATIONS_OPEN


def _write_toy(d: Path, n_users: int = 120, n_items: int = 40, seed: int = 1) -> Path:
    """Items with a fixed successor (85% of steps follow it), 2 attributes each: the Beauty file format."""
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
    (d / "Toy.txt").write_text("\n".join(lines) + "\n")
    (d / "Toy_item2attributes.json").write_text(json.dumps({str(i): [1 + i % 5, 6 + i % 3] for i in range(1, n_items + 1)}))
    return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ar")
    data = _write_toy(root / "data")
    out = root / "prepared"
    argv = ["prepare", "--data_dir", str(data), "--output_dir", str(out), "--codebook_size", "4",  # name inferred: Toy
            "--max_history", "5", "--vocab_size", "600", "--mid_rows", "40"]
    assert main(argv) == 0
    return out


def test_prepare_writes_datasets_tokenizer_summary(prepared, capsys):
    for split in ("train", "valid", "test"):
        ds = load_from_disk(str(prepared / "datasets" / split))
        assert set(COLUMNS) <= set(ds.column_names) and len(ds) > 0
        jsonl = [json.loads(x) for x in (prepared / "datasets" / f"{split}.jsonl").read_text().splitlines()]
        assert len(jsonl) == len(ds) and jsonl[0]["prompt"] == ds[0]["prompt"]
        for row in ds.select(range(min(5, len(ds)))):
            c = row["completion"]
            assert c[row["answer_start"] :].startswith(RECOMMENDATIONS_OPEN)
            parsed = parse_ranking(c, row["candidates"])
            assert parsed.valid and parsed.ranking[0] == row["target"]
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["token_lengths"]["test"]["completion"]["mean"] > 0
    assert summary["rows"]["mid"] == 40 == len(load_from_disk(str(prepared / "datasets" / "mid")))
    # every training prefix is a candidate row; with leave-one-out candidates the train floor is not inflated
    prerank = json.loads((prepared / "prerank.json").read_text())
    assert prerank["train_rows"] == "all_prefixes"
    assert prerank["splits"]["train"]["users"] > 3 * prerank["splits"]["test"]["users"]
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in prepared.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    # Re-running with the same inputs on a complete directory skips the work; other inputs are refused, by name.
    stamp = (prepared / "summary.json").stat().st_mtime_ns
    argv = ["prepare", "--data_dir", str(prepared.parent / "data"), "--output_dir", str(prepared), "--codebook_size", "4",
            "--max_history", "5", "--vocab_size", "600", "--mid_rows", "40"]
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (prepared / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other inputs \(options.max_history: 5 -> 6\).*--overwrite"):
        main([*argv[:-5], "6", *argv[-4:]])
    (prepared.parent / "data" / "Toy.txt").write_text((prepared.parent / "data" / "Toy.txt").read_text() + "999 1 2 3\n")
    try:
        with pytest.raises(ValueError, match=r"data.files"):
            main(argv)
    finally:
        _write_toy(prepared.parent / "data")
    assert main(argv) == 0


def test_match_target_positions_follows_reference():
    cands = list(range(10))
    ex = [{"candidates": cands, "target": 0}] * 600 + [{"candidates": cands, "target": 5}] * 400
    ref = [{"candidates": cands, "target": 0}] * 30 + [{"candidates": cands, "target": 5}] * 70
    kept = match_target_positions(ex, ref, seed=0)
    share = sum(r["target"] == 5 for r in kept) / len(kept)
    assert abs(share - 0.7) < 0.06 and sum(r["target"] == 5 for r in kept) == 400  # the rarer position kept whole


def test_train_ar_sft_rl_then_evaluate(prepared, tmp_path):
    out = tmp_path / "model"
    argv = ["train-ar", "--dataset_name", str(prepared), "--output_dir", str(out), "--stage", "all", "--preset", "cpu",
            "--shape", "tiny", "--threads", "0", "--mid_max_steps", "2", "--mid_batch_size", "4",
            "--sft_max_steps", "4", "--sft_batch_size", "4", "--rl_max_steps", "1",
            "--rl_prompts_per_step", "2", "--rl_num_generations", "2", "--rl_max_completion_length", "16",
            "--logging_steps", "1"]
    assert main(argv) == 0
    for stage in ("mid", "sft", "rl"):
        assert (out / stage / "config.json").is_file() and (out / stage / "tokenizer.json").is_file()
        info = json.loads((out / f"train_{stage}.json").read_text())
        assert info["global_step"] if "global_step" in info else info["log_history"]
    assert json.loads((out / "train_mid.json").read_text())["rows"] == 40
    assert json.loads((out / "train_sft.json").read_text())["args"]["shape"] == "tiny"  # CLI beats preset

    result = tmp_path / "eval.json"
    argv = ["evaluate", "--model_name_or_path", str(out / "sft"), "--dataset_name", str(prepared), "--split", "test",
            "--limit", "6", "--max_completion_length", "8", "--batch_size", "4", "--json", str(result), "--outputs", str(tmp_path / "o.json")]
    assert main(argv) == 0
    r = json.loads(result.read_text())
    assert r["n"] == 6 and set(r["metrics"]) >= {"R@1", "R@3", "R@5", "N@3", "N@5", "valid_rate", "errors", "tokens_per_s"}
    # An 8-token cap cannot hold a ranking: every output is invalid and falls back to the pre-rank order.
    assert r["metrics"]["valid_rate"] == 0.0
    assert all(r["metrics"][k] == pytest.approx(r["prerank"][k]) for k in ("R@1", "R@3", "N@3"))
    outputs = json.loads((tmp_path / "o.json").read_text())
    assert len(outputs) == 6 and all(o["rank"] == o["prerank_rank"] for o in outputs)  # invalid: pre-rank fallback


def test_logistic_baseline_on_prepared_rows(prepared):
    from diffgr2_trl.rerank.baselines import evaluate_logistic

    r = evaluate_logistic(prepared, split="test", limit=10)
    assert r["n"] == len(r["ranks"]) == len(r["prerank_ranks"]) == 10
    assert r["prerank"]["R@1"] == sum(p == 0 for p in r["prerank_ranks"]) / 10
    assert set(r["coefficients"]) >= {"position", "shared_last", "log_popularity", "bias"}


def test_unknown_preset_and_stage(prepared, tmp_path):
    with pytest.raises(ValueError, match="Unknown ar preset 'nope'"):
        main(["train-ar", "--dataset_name", str(prepared), "--output_dir", str(tmp_path), "--preset", "nope"])
    with pytest.raises(ValueError, match="--stage"):
        main(["train-ar", "--dataset_name", str(prepared), "--output_dir", str(tmp_path), "--stage", "dpo"])
    # the old spellings parse to the same arguments, with a FutureWarning each
    from diffgr2_trl.commands import train_ar

    with pytest.warns(FutureWarning) as seen:
        (old,) = train_ar.parse(["--prepared", str(prepared), "--out", str(tmp_path), "--preset", "cpu"])
    assert {str(w.message).split(":")[1].strip().split(" ")[0] for w in seen} == {"--prepared", "--out"}
    (new,) = train_ar.parse(["--dataset_name", str(prepared), "--output_dir", str(tmp_path), "--preset", "cpu"])
    assert old == new and new.preset == "cpu" and new.sft_max_steps == 260  # the preset's value


def test_train_ar_preset_leaves_no_temp_file(prepared, tmp_path, monkeypatch):
    import tempfile

    from diffgr2_trl.commands import train_ar

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft_max_steps: 3\n")
    (args,) = train_ar.parse(["--dataset_name", str(prepared), "--output_dir", str(tmp_path / "o"), "--preset", "cpu",
                              "--config", str(cfg), "--shape", "tiny"])
    assert (args.sft_max_steps, args.shape, args.rl_max_steps) == (3, "tiny", 15)  # config > preset, CLI > config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _beauty_available() -> bool:
    try:
        locate_data_dir(None)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _beauty_available(), reason="Amazon Beauty data not present")
def test_rows_on_real_beauty_examples():
    """A few real users through build_rows (no full prepare: that takes ~80 s)."""
    from diffgr2_trl.rerank.data import leave_one_out, load_sequence_data
    from diffgr2_trl.rerank.semantic_ids import SemanticIds

    data = load_sequence_data(None)
    split = leave_one_out(data.sequences)
    rng = random.Random(0)
    items = sorted(data.item_attributes)
    examples = []
    for u in list(split.test)[:100]:
        history, target = split.test[u]
        others = [i for i in rng.sample(items, 20) if i != target and i not in history][:9]
        cands = others[:3] + [target] + others[3:]  # no pre-ranker needed to test formatting
        examples.append({"user_id": u, "history": history, "candidates": cands, "target": target})
    codes = {i: (i % 7, i % 11, i % 13, i) for i in data.item_attributes}  # any unique IDs do for formatting
    sids = SemanticIds(codes, max(codes) + 1, data.item_attributes)
    rows = build_rows(examples, sids)
    assert rows and all(parse_ranking(r["completion"], r["candidates"]).ranking[0] == r["target"] for r in rows)
