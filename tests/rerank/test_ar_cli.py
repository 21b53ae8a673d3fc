"""End to end through ``diffgr2_trl.cli.main``: prepare (tiny synthetic dataset), train-ar, evaluate."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from diffgr2_trl.cli import main
from diffgr2_trl.rerank.data import locate_data_dir
from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.pipeline_data import COLUMNS, build_rows, match_target_positions
from diffgr2_trl.rerank.prompts import RECOMMENDATIONS_OPEN
from tests.helpers import write_toy_amazon


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ar")
    data = write_toy_amazon(root / "data")
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
        write_toy_amazon(prepared.parent / "data")
    assert main(argv) == 0


def test_match_target_positions_follows_reference():
    cands = list(range(10))
    ex = [{"candidates": cands, "target": 0}] * 600 + [{"candidates": cands, "target": 5}] * 400
    ref = [{"candidates": cands, "target": 0}] * 30 + [{"candidates": cands, "target": 5}] * 70
    kept = match_target_positions(ex, ref, seed=0)
    share = sum(r["target"] == 5 for r in kept) / len(kept)
    assert abs(share - 0.7) < 0.06 and sum(r["target"] == 5 for r in kept) == 400  # the rarer position kept whole


@pytest.mark.slow  # ~25 s quiet: three training stages and an evaluation through the CLI
def test_train_ar_sft_rl_then_evaluate(prepared, tmp_path):
    out = tmp_path / "model"
    argv = ["train-ar", "--dataset_name", str(prepared), "--output_dir", str(out), "--stage", "all", "--preset", "cpu",
            "--shape", "tiny", "--threads", "0", "--mid_max_steps", "2", "--mid_batch_size", "4", "--mid_eval_lists", "4",
            "--mid_mix", "front=1", "--mid_mix_end", "front=1,rerank=1", "--sft_max_steps", "4", "--sft_batch_size", "4", "--rl_max_steps", "1",
            "--rl_prompts_per_step", "2", "--rl_num_generations", "2", "--rl_max_completion_length", "16",
            "--logging_steps", "1"]
    assert main(argv) == 0
    for stage in ("mid", "sft", "rl"):
        assert (out / stage / "config.json").is_file() and (out / stage / "tokenizer.json").is_file()
        info = json.loads((out / f"train_{stage}.json").read_text())
        assert info["global_step"] if "global_step" in info else info["log_history"]
    mid = json.loads((out / "train_mid.json").read_text())
    assert mid["lists"] == 2 * 4 and mid["id_line"] is True and 0 <= mid["heldout"]["exact"] <= 1  # fresh lists
    # the prepared source trains on the `mid` split with TRL's SFTTrainer
    assert main(["train-ar", "--dataset_name", str(prepared), "--output_dir", str(tmp_path / "prepared-mid"),
                 "--stage", "mid", "--mid_source", "prepared", "--shape", "tiny", "--mid_max_steps", "2",
                 "--mid_batch_size", "4"]) == 0
    assert json.loads((tmp_path / "prepared-mid" / "train_mid.json").read_text())["rows"] == 40
    assert json.loads((out / "train_sft.json").read_text())["args"]["shape"] == "tiny"  # CLI beats preset

    # Constrained rollouts: an untrained tiny model's samples are all valid rankings (unconstrained: none are).
    rows = load_from_disk(str(prepared / "datasets" / "train"))
    answer = len(rows[0]["completion"]) - rows[0]["completion"].index(RECOMMENDATIONS_OPEN)  # characters >= tokens
    argv = ["train-ar", "--dataset_name", str(prepared), "--output_dir", str(tmp_path / "crl"), "--stage", "rl",
            "--model_name_or_path", str(out / "sft"), "--shape", "tiny", "--rl_max_steps", "1", "--rl_constrained",
            "--rl_prompts_per_step", "2", "--rl_num_generations", "2", "--rl_max_completion_length", str(answer + 8),
            "--logging_steps", "1", "--use_cpu"]
    assert main(argv) == 0
    logged = json.loads((tmp_path / "crl" / "train_rl.json").read_text())["log_history"][0]
    assert logged["rewards/validity/mean"] == 1.0 and logged["reward"] > -1.0

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


def test_prepare_can_write_attributes_rarest_first_with_rarity_marks_and_older_directories_still_match(prepared, tmp_path):
    import shutil
    from collections import Counter

    from diffgr2_trl.commands.prepare import _predating
    from diffgr2_trl.rerank.semantic_ids import SemanticIds

    recorded = json.loads((prepared / "summary.json").read_text())["inputs"]
    older = {**recorded, "options": {k: v for k, v in recorded["options"].items()
                                     if k not in ("attribute_order", "evidence_features", "rarity_marks")}}
    assert _predating(older, recorded) == recorded  # prepared before these options existed: still matches
    rarity = {**recorded, "options": {**recorded["options"], "attribute_order": "rarity"}}
    assert _predating(older, rarity) != rarity  # but not a run that asks for another order
    data = shutil.copytree(prepared.parent / "data", tmp_path / "data")
    listing = next(data.glob("*_item2attributes.json"))  # the toy lists brand first; list the commonest first
    listed = {i: v[::-1] for i, v in json.loads(listing.read_text()).items()}
    listing.write_text(json.dumps(listed))
    out = tmp_path / "rare"
    assert main(["prepare", "--data_dir", str(data), "--output_dir", str(out), "--codebook_size", "4",
                 "--max_history", "5", "--vocab_size", "600", "--attribute_order", "rarity", "--rarity_marks", "2"]) == 0
    sids = SemanticIds.load(out / "semantic_ids.json")
    counts = Counter(a for v in sids.item_attributes.values() for a in set(v))
    assert any([counts[a] for a in v] != sorted(counts[a] for a in v) for v in listed.values())  # not sorted as listed
    assert all([counts[a] for a in v] == sorted(counts[a] for a in v) for v in sids.item_attributes.values())
    rows = load_from_disk(str(out / "datasets" / "train"))
    first = rows[0]["prompt"].split("Candidates (pre-rank order):\n")[1].splitlines()[0]
    shown = [int(t) for t in re.findall(r"<attr_(\d+)>", first)]
    assert [counts[a] for a in shown] == sorted(counts[a] for a in shown)
    # --rarity_marks 2: every attribute token is followed by its class, rarer attributes never in a higher class
    marked = re.findall(r"<attr_(\d+)><rare_(\d)>", first)
    assert [int(a) for a, _ in marked] == shown and len(marked) == first.count("<attr_")
    classes = {int(a): int(k) for v in [re.findall(r"<attr_(\d+)><rare_(\d)>", r["prompt"]) for r in rows] for a, k in v}
    assert set(classes.values()) == {0, 1}
    assert all(classes[a] <= classes[b] for a in classes for b in classes if counts[a] < counts[b])
    from diffgr2_trl.rerank.pipeline_data import load_tokenizer

    tok = load_tokenizer(out)
    assert all(len(tok(f"<rare_{k}>", add_special_tokens=False)["input_ids"]) == 1 for k in (0, 1))


def test_prepare_names_an_unknown_evidence_feature_before_any_work(tmp_path):
    from diffgr2_trl.errors import UserError

    with pytest.raises(UserError, match=r"unknown feature\(s\) \['idf_lst'\].*choose among position"):
        main(["prepare", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),  # holds no data yet
              "--targets", "evidence", "--evidence_features", "position,idf_lst"])
    assert not (tmp_path / "out").exists()


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


@pytest.mark.slow  # reads and prepares the real Beauty data
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


# --- bench-copy: copy learning as a curve --------------------------------------------------------------------------
def _copy_inputs(prepared: Path, id_line: bool = True, n: int = 6):
    from diffgr2_trl.rerank.candidates import load_train_sequences
    from diffgr2_trl.rerank.copying import make_heldout
    from diffgr2_trl.rerank.pipeline_data import load_tokenizer
    from diffgr2_trl.rerank.semantic_ids import SemanticIds

    tok = load_tokenizer(prepared)
    sids = SemanticIds.load(prepared / "semantic_ids.json")
    seqs = load_train_sequences(prepared)
    return tok, sids, seqs, make_heldout(seqs, sids, tok, n=n, id_line=id_line, n_candidates=5)


def test_id_line_holds_the_answer_tokens_in_order(prepared):
    """The ID line is the answer list token for token, so copying needs no skipping over attribute tokens; without it
    the prompt is the same but for that line (same items, same order)."""
    from diffgr2_trl.rerank.ar import encode_prompt_completion
    from diffgr2_trl.rerank.midtrain import build_midtraining_rows
    from diffgr2_trl.rerank.prompts import CLOSE, RECOMMENDATIONS_OPEN

    tok, sids, seqs, _ = _copy_inputs(prepared)
    opener, close = tok.convert_tokens_to_ids([RECOMMENDATIONS_OPEN, CLOSE])
    repeat = build_midtraining_rows(seqs, sids, 6, n_candidates=5, mix="repeat=1", seed=2, with_id_line=True)
    ids, masks = encode_prompt_completion([r["prompt"] for r in repeat], [r["completion"] for r in repeat], tok)
    for row, mask in zip(ids, masks):
        prompt, completion = row[: mask.index(1)], row[mask.index(1) :]
        inner = completion[completion.index(opener) + 1 : completion.index(close)]  # SIDs and separators
        assert len(inner) == 5 * 4 + 4
        assert any(prompt[i : i + len(inner)] == inner for i in range(len(prompt) - len(inner) + 1))
    with_ids = build_midtraining_rows(seqs, sids, 20, n_candidates=5, seed=4, with_id_line=True)
    without = build_midtraining_rows(seqs, sids, 20, n_candidates=5, seed=4)
    for a, b in zip(with_ids, without):
        assert a["completion"] == b["completion"] and a["task"] == b["task"]
        if a["task"] in ("front", "repeat", "drop"):
            assert a["prompt"].startswith(b["prompt"] + '\nIDs: ["')
        else:
            assert a["prompt"] == b["prompt"]


class _Oracle(torch.nn.Module):
    """Teacher forcing's perfect model: position i predicts the token at i + 1 (``wrong`` flips one answer token)."""

    def __init__(self, vocab: int, wrong: tuple[int, int] | None = None):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong is not None:
            row, pos = self.wrong
            nxt[row, pos - 1] = (nxt[row, pos - 1] + 1) % self.vocab
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})()


def test_teacher_forced_exact_counts_every_answer_token(prepared):
    from diffgr2_trl.rerank.copying import teacher_forced_exact

    tok, _, _, held = _copy_inputs(prepared)
    assert teacher_forced_exact(_Oracle(len(tok)), held, tok.pad_token_id, batch_size=4) == [True] * 6
    last = len(held.input_ids[2]) - 1  # the EOS of list 2 counts
    got = teacher_forced_exact(_Oracle(len(tok), wrong=(2, last)), held, tok.pad_token_id)
    assert got == [True, True, False, True, True, True]
    # a wrong token before the answer (in the explanation) does not count
    got = teacher_forced_exact(_Oracle(len(tok), wrong=(0, held.answer_starts[0] - 1)), held, tok.pad_token_id)
    assert got == [True] * 6


def test_rerank_heldout_scores_the_answer_of_valid_rows(prepared):
    """Held-out re-ranking rows: the first rows of the valid split, the answer's IDs as the expected ranking, and
    teacher-forced exact judged on the answer only (the explanation is the model's own business)."""
    from diffgr2_trl.rerank.copying import make_rerank_heldout, teacher_forced_exact
    from diffgr2_trl.rerank.pipeline_data import load_split, load_tokenizer

    tok = load_tokenizer(prepared)
    held = make_rerank_heldout(prepared, tok, n=4)
    rows = load_split(prepared, "valid").select(range(4))
    assert held.prompts == rows["prompt"] and len(held.input_ids) == 4
    for expected, cands, row in zip(held.expected, held.candidates, rows):
        assert parse_ranking(row["completion"], row["candidates"]).valid
        assert len(expected) == len(row["candidates"]) and sorted(expected) == cands
    oracle = _Oracle(len(tok))
    assert teacher_forced_exact(oracle, held, tok.pad_token_id) == [True] * 4
    slot = held.answer_starts[1] + 3  # inside the first answer ID of row 1
    assert teacher_forced_exact(_Oracle(len(tok), wrong=(1, slot)), held, tok.pad_token_id) == [True, False, True, True]
    cited = held.prompt_lengths[3] + 2  # an explanation token of row 3
    assert teacher_forced_exact(_Oracle(len(tok), wrong=(3, cited)), held, tok.pad_token_id) == [True] * 4
    assert len(make_rerank_heldout(prepared, tok, n=10**6).input_ids) == len(load_split(prepared, "valid"))


def test_completion_loss_equals_full_logits_cross_entropy(prepared):
    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank.copying import _batch, _completion_loss
    from diffgr2_trl.rerank.midtrain import build_midtraining_rows

    tok, sids, seqs, _ = _copy_inputs(prepared)
    rows = build_midtraining_rows(seqs, sids, 5, n_candidates=5, seed=1)
    ids, attention, targets, n_tokens = _batch(rows, tok, tok.pad_token_id)
    model = build_model("qwen3", tokenizer=tok, shape="tiny", seed=0)
    logits = model(input_ids=ids, attention_mask=attention).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(_completion_loss(model, ids, attention, targets), ref, rtol=1e-5, atol=1e-5)
    assert n_tokens == int(attention.sum()) and (targets != -100).sum() < n_tokens
    # rows run apart by length class (as train_copying does for re-ranking rows): same mean over all tokens
    parts = [_batch(rows[:2], tok, tok.pad_token_id), _batch(rows[2:], tok, tok.pad_token_id)]
    total = sum(int((p[2] != -100).sum()) for p in parts)
    split = sum(_completion_loss(model, *p[:3], reduction="sum") for p in parts) / total
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)


def test_only_right_padded_batches_drop_their_mask():
    from diffgr2_trl.rerank.copying import _right_padded

    assert _right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not _right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding needs its mask
    assert not _right_padded(torch.tensor([[1, 0, 1]]))


def test_learning_rate_schedule():
    from diffgr2_trl.rerank.copying import CopyRecipe, lr_at

    r = CopyRecipe(learning_rate=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(10, r) == pytest.approx(1.0) and lr_at(60, r) == pytest.approx(0.55)
    assert lr_at(110, r) == pytest.approx(0.1) and lr_at(500, r) == pytest.approx(0.1)
    assert lr_at(80, CopyRecipe(learning_rate=2.0, schedule="constant", warmup_steps=10)) == 2.0
    with pytest.raises(ValueError, match="schedule must be constant or cosine"):
        CopyRecipe(schedule="linear")


def test_mix_curriculum_moves_linearly_from_mix_to_mix_end(prepared):
    from diffgr2_trl.rerank.copying import CopyRecipe, mix_at, rerank_rows_for

    r = CopyRecipe(mix="front=3,rerank=1", mix_end="front=1,drop=1,rerank=2", max_steps=11)
    assert mix_at(0, r) == pytest.approx({"front": 0.75, "rerank": 0.25})
    assert mix_at(5, r) == pytest.approx({"drop": 0.125, "front": 0.5, "rerank": 0.375})
    assert mix_at(10, r) == pytest.approx({"drop": 0.25, "front": 0.25, "rerank": 0.5}) == mix_at(99, r)
    assert mix_at(7, CopyRecipe(mix="front=2,drop=2")) == {"front": 0.5, "drop": 0.5}  # no curriculum
    # the re-ranking rows load when any step of the curriculum needs them
    assert rerank_rows_for(CopyRecipe(mix="front=1"), prepared) is None
    assert rerank_rows_for(CopyRecipe(mix="front=1", mix_end="front=1,rerank=1"), prepared)
    with pytest.raises(ValueError, match="unknown tasks"):
        CopyRecipe(mix="front=1", mix_end="fronts=1")


def test_bench_copy_writes_a_curve(prepared, tmp_path, capsys):
    out = tmp_path / "copy"
    argv = ["bench-copy", "--dataset_name", str(prepared), "--output_dir", str(out), "--shape", "tiny",
            "--n_candidates", "5", "--batch_size", "8", "--max_steps", "6", "--eval_steps", "3", "--eval_lists", "4",
            "--warmup_steps", "1", "--learning_rate", "0.01", "--id_line", "--threads", "1"]
    assert main(argv) == 0
    result = json.loads((out / "curve.json").read_text())
    points = result["points"]
    assert [p["step"] for p in points] == [0, 3, 6] and [p["lists"] for p in points] == [0, 24, 48]
    assert points[0]["loss"] is None and points[2]["loss"] < points[1]["loss"]  # fresh lists, and it learns
    assert all(0 <= p[k] <= 1 for p in points for k in ("exact", "valid", "correct"))
    assert result["recipe"]["id_line"] is True and result["params"] > 0 and "exact>=0.9" in result["reached"]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "90% exact" in capsys.readouterr().out
    assert "rerank_exact" not in points[0] and result["eval_rerank_rows"] == 0
    # held-out re-ranking rows: scored at every point, reported and plotted beside the lists
    assert main([*argv[:4], str(tmp_path / "copy2"), *argv[5:], "--max_steps", "3", "--eval_rerank_rows", "3",
                 "--compare", str(out / "curve.json")]) == 0
    second = json.loads((tmp_path / "copy2" / "curve.json").read_text())
    assert second["eval_rerank_rows"] == 3 and "rerank_exact>=0.9" in second["reached"]
    assert all(0 <= p[f"rerank_{k}"] <= 1 for p in second["points"] for k in ("exact", "valid", "correct"))
    assert "re-ranking exact" in capsys.readouterr().out
    with pytest.raises(ValueError, match="eval_rerank_rows must be >= 0"):
        main([*argv, "--eval_rerank_rows", "-1"])
    with pytest.raises(ValueError, match="no semantic_ids.json"):
        main(["bench-copy", "--dataset_name", str(tmp_path), "--output_dir", str(out)])
