"""Training rows that let a small re-ranker learn: leave-one-out prefixes, SID mid-training tasks, the logistic
baseline, paired bootstrap intervals, dataset-name inference and the batched SFT tokenisation."""

from __future__ import annotations

import json
import random

import pytest
import torch

from diffgr2_trl.rerank.baselines import LogisticReRanker, candidate_features
from diffgr2_trl.rerank.candidates import _split_inputs
from diffgr2_trl.rerank.data import infer_dataset_name, leave_one_out, load_sequence_data
from diffgr2_trl.rerank.metrics import paired_bootstrap_ci
from diffgr2_trl.rerank.midtrain import ItemPool, build_midtraining_rows, parse_task_mix
from diffgr2_trl.rerank.parsing import parse_ranking
from diffgr2_trl.rerank.prerank import PopularityPreRanker, TransitionPreRanker, recommend
from diffgr2_trl.rerank.prompts import SID_RE


def _sequences(n_users: int = 30, n_items: int = 25, seed: int = 0) -> dict[int, list[int]]:
    rng = random.Random(seed)
    return {u: [rng.randint(1, n_items) for _ in range(rng.randint(3, 9))] for u in range(1, n_users + 1)}


@pytest.mark.parametrize("backward_weight", [0.0, 0.5])
def test_held_out_scores_equal_a_model_fitted_without_the_users_future(backward_weight):
    train = _sequences()
    full = TransitionPreRanker(25, backward_weight=backward_weight, popularity_weight=0.0).fit(train)
    for u, i in [(1, 1), (2, 2), (5, len(train[5]) - 1)]:
        seq = train[u]
        refit = TransitionPreRanker(25, backward_weight=backward_weight, popularity_weight=0.0).fit(
            {**train, u: seq[:i]})
        got = full.score([seq[:i]], held_out=[(seq, i)])
        assert torch.allclose(got, refit.score([seq[:i]]), atol=1e-5)
    # without held_out, the user's own transition into the target inflates its score
    seq = train[3]
    assert full.score([seq[:1]])[0, seq[1]] > full.score([seq[:1]], held_out=[(seq, 1)])[0, seq[1]]


def test_held_out_popularity_is_removed_and_bad_cuts_are_errors():
    train = {1: [1, 2, 3], 2: [1, 2, 2, 2]}  # item 2 is the most popular with or without user 1's future
    pre = TransitionPreRanker(3, popularity_weight=1.0).fit(train)
    refit = TransitionPreRanker(3, popularity_weight=1.0).fit({1: [1], 2: train[2]})
    assert torch.allclose(pre.score([[1]], held_out=[(train[1], 1)]), refit.score([[1]]), atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        pre.score([[1, 2, 3]], held_out=[(train[1], 3)])
    with pytest.raises(ValueError, match="leave-one-out|Leave-one-out"):
        recommend(PopularityPreRanker(3).fit(train), [[1]], k=2, held_out=[(train[1], 1)])


def test_all_prefix_rows_cover_every_training_position():
    seqs = {1: [5, 6, 7, 8, 9, 10], 2: [1, 2, 3, 4]}
    split = leave_one_out(seqs)
    users, hists, targets, held = _split_inputs(split, "train", "all_prefixes")
    assert len(users) == sum(len(s) - 1 for s in split.train.values())
    assert all(h == seq[:i] and t == seq[i] for h, t, (seq, i) in zip(hists, targets, held))
    assert [t for u, t in zip(users, targets) if u == 1] == split.train[1][1:]  # never a valid/test item
    last = _split_inputs(split, "train", "last")
    assert last[2] == [split.train[u][-1] for u in last[0]]
    with pytest.raises(ValueError, match="train_rows"):
        _split_inputs(split, "train", "every")


class _Sids:
    """A stand-in for SemanticIds: item i -> <a_i><b_0><c_0><d_0> with two attribute tokens."""

    def __contains__(self, item):
        return True

    def encode(self, item):
        return f"<a_{item}><b_0><c_0><d_0>"

    def attribute_tokens(self, item):
        return [f"<attr_{item % 4}>", f"<attr_{4 + item % 3}>"]


def test_midtraining_rows_are_correct_seeded_and_diverse():
    train = _sequences(n_items=60)
    rows = build_midtraining_rows(train, _Sids(), 300, seed=3)
    assert rows == build_midtraining_rows(train, _Sids(), 300, seed=3)
    # the training loop builds the item pool once and passes it to every step: the same rows
    assert rows == build_midtraining_rows({}, _Sids(), 300, seed=3, pool=ItemPool.build(train, _Sids()))
    assert {r["task"] for r in rows} == {"front", "repeat", "drop", "next", "attributes"}
    for r in rows:
        shown = SID_RE.findall(r["prompt"].split("Candidates (pre-rank order):")[-1])
        if r["task"] in ("front", "repeat"):
            parsed = parse_ranking(r["completion"], shown)
            assert parsed.valid, r
            if r["task"] == "front":
                named = SID_RE.findall(r["prompt"].splitlines()[0])[0]
                assert parsed.ranking == [named] + [s for s in shown if s != named]
            else:
                assert parsed.ranking == shown
        elif r["task"] == "drop":
            named = SID_RE.findall(r["prompt"].splitlines()[0])[0]
            assert SID_RE.findall(r["completion"].split("recommendations")[1]) == [s for s in shown if s != named]
        elif r["task"] == "next":
            assert SID_RE.fullmatch(r["completion"])
    lists = [r["prompt"] for r in rows if r["task"] in ("front", "repeat", "drop")]
    assert len(set(lists)) == len(lists)  # no list repeats: nothing to memorise
    # with the ID line the list prompts end with the shown IDs in order; other tasks are unchanged
    with_ids = build_midtraining_rows(train, _Sids(), 300, seed=3, with_id_line=True)
    for a, b in zip(with_ids, rows):
        shown = SID_RE.findall(b["prompt"].split("Candidates (pre-rank order):")[-1])
        assert a["prompt"] == (b["prompt"] + '\nIDs: ["' + '", "'.join(shown) + '"]'
                               if b["task"] in ("front", "repeat", "drop") else b["prompt"])


def test_midtraining_rerank_task_draws_training_rows():
    train = _sequences(n_items=60)
    pool = [{"prompt": f"p{i}", "completion": f"c{i}", "extra": i} for i in range(5)]
    rows = build_midtraining_rows(train, _Sids(), 200, mix="front=0.5,rerank=0.5", seed=1, rerank_rows=pool)
    drawn = [r for r in rows if r["task"] == "rerank"]
    assert 60 < len(drawn) < 140 and {r["task"] for r in rows} == {"front", "rerank"}
    assert all({"prompt": r["prompt"], "completion": r["completion"]} in
               [{"prompt": p["prompt"], "completion": p["completion"]} for p in pool] for r in drawn)
    with pytest.raises(ValueError, match="'rerank' task needs rerank_rows"):
        build_midtraining_rows(train, _Sids(), 10, mix="rerank=1", seed=1)


def test_task_mix_parsing():
    assert parse_task_mix("front=3,repeat=1") == {"front": 0.75, "repeat": 0.25}
    assert abs(sum(parse_task_mix(None).values()) - 1) < 1e-9
    with pytest.raises(ValueError, match="unknown tasks"):
        parse_task_mix("copy=1")
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_task_mix("front")
    with pytest.raises(ValueError, match=">= 0"):
        parse_task_mix({"front": 0})


def test_infer_dataset_name(tmp_path):
    (tmp_path / "Toys.txt").write_text("1 1 2 3\n")
    (tmp_path / "Toys_item2attributes.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    assert infer_dataset_name(tmp_path) == "Toys"
    assert load_sequence_data(tmp_path, None).sequences == {1: [1, 2, 3]}
    (tmp_path / "Games.txt").write_text("1 1 2 3\n")
    (tmp_path / "Games_item2attributes.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="Several datasets"):
        infer_dataset_name(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "Beauty.txt.gz").write_text("")
    with pytest.raises(FileNotFoundError, match=r"found \['Beauty.txt.gz'\]"):
        infer_dataset_name(empty)


def test_logistic_reranker_learns_the_attribute_signal():
    rng = random.Random(0)
    attrs = {i: [f"<attr_{i % 7}>"] for i in range(1, 200)}
    feats, targets = [], []
    for _ in range(300):
        history = rng.sample(range(1, 200), 4)
        cands = rng.sample([i for i in range(1, 200) if i not in history], 10)
        # the target is the candidate that shares the last item's attribute (when one does), else position 0
        match = [c for c in cands if attrs[c] == attrs[history[-1]]]
        target = match[0] if match else cands[0]
        feats.append(candidate_features(history, cands, attrs, {}))
        targets.append(cands.index(target))
    model = LogisticReRanker().fit(feats[:200], targets[:200])
    hits = sum(model.rerank(f)[0] == t for f, t in zip(feats[200:], targets[200:]))
    assert hits >= 95  # the pre-rank order alone gets far fewer
    assert sum(t == 0 for t in targets[200:]) < 60
    assert model.coefficients()["shared_last"] > 0


def _logistic_lists(true_w, n_lists=400, n_cands=10, seed=0):
    """Lists whose target is drawn from a softmax over ``x @ true_w`` (six standard-normal features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_lists, n_cands, len(true_w), generator=g, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(x @ true_w, -1), 1, generator=g)[:, 0]
    return x.tolist(), targets.tolist()


def test_logistic_reranker_minimises_the_stated_objective():
    """sklearn's C is mapped so the fit minimises mean log-loss + l2 * |w|^2 (bias unpenalised): the gradient of
    that objective, written out here, vanishes at the fitted weights (a wrong C leaves a gradient of ~l2 * |w|)."""
    feats, targets = _logistic_lists(torch.tensor([2.0, -1.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64))
    for l2 in (1e-3, 0.05):
        model = LogisticReRanker(l2=l2).fit(feats, targets)
        x = torch.tensor([f for ex in feats for f in ex], dtype=torch.float64)
        y = torch.tensor([float(c == t) for ex, t in zip(feats, targets) for c in range(len(ex))], dtype=torch.float64)
        z = torch.cat([(x - model.mean) / model.std, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        w = model.weights.clone().requires_grad_(True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y) + l2 * (w[:-1] ** 2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        assert grad.abs().max() < 1e-5, (l2, grad)
        assert model.weights.dtype == torch.float64 and model.weights.shape == (7,)


def test_logistic_reranker_recovers_a_known_direction():
    true_w = torch.tensor([2.0, -1.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    feats, targets = _logistic_lists(true_w, n_lists=1500)
    w = LogisticReRanker(l2=1e-6).fit(feats, targets).weights[:-1]
    # standardised features have std ~1, so the weights are the true direction up to the pointwise-vs-softmax scale
    cos = float(w @ true_w / (w.norm() * true_w.norm()))
    assert cos > 0.98, w
    assert abs(float(w[3])) < 0.1 and abs(float(w[4])) < 0.1 and w[0] > w[5] > w[2] > 0 > w[1]


def test_paired_bootstrap_ci():
    same = paired_bootstrap_ci([0, 1, 2, 0], [0, 1, 2, 0])
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}
    better = paired_bootstrap_ci([0] * 50, [3] * 50)
    assert better["diff"] == 1.0 and better["lo"] == 1.0
    assert paired_bootstrap_ci([0], [4]) == {"diff": 1.0, "lo": 1.0, "hi": 1.0, "n": 1}
    rng = random.Random(1)
    a = [rng.randint(0, 9) for _ in range(400)]
    b = [rng.randint(0, 9) for _ in range(400)]
    ci = paired_bootstrap_ci(a, b, seed=2)
    assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["hi"] - ci["lo"] < 0.15
    assert paired_bootstrap_ci(a, b, seed=2) == ci and paired_bootstrap_ci(a, b, seed=3) != ci
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_ci([0], [0, 1])


def test_paired_bootstrap_ci_agrees_with_a_hand_written_percentile_bootstrap():
    """scipy.stats.bootstrap (paired, percentile) replaced this loop; endpoints agree within Monte Carlo noise (the
    old ones spread by ~0.0015 across seeds at n = 400), and the width is the one the standard error implies."""
    import numpy as np

    rng = random.Random(3)
    b = [rng.randint(0, 9) for _ in range(400)]
    a = [r if rng.random() < 0.8 else 0 for r in b]  # a = b, but 20% of the rows moved to the top
    hit = lambda ranks, k: np.array([float(r < k) for r in ranks])  # noqa: E731
    for metric, k in (("R@1", 1), ("R@3", 3)):
        d = hit(a, k) - hit(b, k)
        boots = d[np.random.default_rng(123).integers(0, len(d), size=(4000, len(d)))].mean(1)
        ci = paired_bootstrap_ci(a, b, metric=metric, n_boot=4000, seed=7)
        assert ci["diff"] == pytest.approx(d.mean(), abs=1e-12) and ci["n"] == 400
        assert ci["lo"] == pytest.approx(np.quantile(boots, 0.025), abs=0.006)
        assert ci["hi"] == pytest.approx(np.quantile(boots, 0.975), abs=0.006)
        se = d.std() / np.sqrt(len(d))
        assert ci["hi"] - ci["lo"] == pytest.approx(2 * 1.96 * se, rel=0.1)
        assert ci["lo"] > 0  # a real improvement is detected


def test_batched_sft_tokenisation_matches_trl(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank.ar import tokenize_prompt_completion
    from diffgr2_trl.rerank.tokenizer import train_rerank_tokenizer

    sid_tokens = [f"<{lv}_{i}>" for lv in "abcd" for i in range(4)]
    tok = train_rerank_tokenizer(["hello world " * 20, "rank the items"], sid_tokens, ["<attr_0>"], vocab_size=300)
    rows = [{"prompt": "rank <a_1><b_2><c_0><d_0> now", "completion": '{"explanation": "x", "recommendations": []}'},
            {"prompt": "hello", "completion": "world plain"},  # starts with no added token: joint tokenisation
            {"prompt": "item <a_3>", "completion": "<b_1>"}]
    ours = tokenize_prompt_completion(Dataset.from_list(rows), tok)
    model = build_model("qwen3", tokenizer=tok, shape="tiny")
    cfg = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", completion_only_loss=True, max_steps=1)
    theirs = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok).train_dataset
    ref = SFTTrainer(model=model, args=cfg, train_dataset=ours, processing_class=tok).train_dataset
    assert theirs["input_ids"] == ref["input_ids"] and theirs["labels"] == ref["labels"]
    assert json.dumps(ours[0]["completion_mask"]).count("1") > 0


def test_candidates_come_from_a_leave_one_out_pre_ranker(tmp_path):
    from diffgr2_trl.rerank.candidates import prepare_data

    d = tmp_path / "data"
    d.mkdir()
    (d / "Toy.txt").write_text("\n".join(f"{u} " + " ".join(str(1 + (u * 7 + k) % 30) for k in range(6))
                                         for u in range(1, 60)) + "\n")
    (d / "Toy_item2attributes.json").write_text(json.dumps({str(i): [i % 3 + 1] for i in range(1, 31)}))
    p = prepare_data(d, tmp_path / "a", prerankers=("popularity", "transition"), codebook_size=4, progress=False)
    assert p.prerank["chosen"] == "transition" and "popularity" in p.prerank["full_ranking"]
    with pytest.raises(ValueError, match="leave-one-out pre-ranker"):
        prepare_data(d, tmp_path / "b", prerankers=("popularity",), codebook_size=4, progress=False)
    last = prepare_data(d, tmp_path / "c", prerankers=("popularity",), codebook_size=4, train_rows="last", progress=False)
    assert last.prerank["chosen"] == "popularity"


def test_a_model_is_refused_on_prepared_data_with_other_ids_unless_allowed(tmp_path, caplog):
    """A model records the prepared data it was trained on; other semantic IDs or another tokenizer (another Amazon
    dataset, say) are refused, naming both, unless --allow_other_data; other preparation options are not."""
    import json

    from diffgr2_trl.errors import UserError
    from diffgr2_trl.rerank.pipeline_data import DATA_RECORD, check_model_data, record_training_data

    def prepared(name: str, dataset: str, sids: str, max_train: int | None = None):
        d = tmp_path / name
        (d / "tokenizer").mkdir(parents=True)
        (d / "tokenizer" / "tokenizer.json").write_text('{"vocab": 1}')
        (d / "semantic_ids.json").write_text(sids)
        (d / "summary.json").write_text(json.dumps({"inputs": {"data": {"dataset": dataset}},
                                                    "max_train_examples": max_train}))
        return d

    beauty, beauty_small = prepared("beauty", "Beauty", '{"1": "a"}'), prepared("small", "Beauty", '{"1": "a"}', 160)
    toys = prepared("toys", "Toys", '{"1": "b"}')
    model = tmp_path / "model"
    model.mkdir()
    check_model_data(model, toys)  # no record: a model trained elsewhere is not checked
    record_training_data(model, beauty)
    assert json.loads((model / DATA_RECORD).read_text())["dataset"] == "Beauty"
    check_model_data(model, beauty_small)  # same IDs and tokenizer, fewer train rows: fine
    with pytest.raises(UserError, match=r"trained on Beauty .* not on Toys .*--allow_other_data"):
        check_model_data(model, toys)
    with caplog.at_level("WARNING"):
        check_model_data(model, toys, allow_other_data=True)
    assert "--allow_other_data" in caplog.text
    check_model_data(model, tmp_path / "not-prepared")  # a plain dataset file or directory: nothing to compare


def test_promote_task_moves_a_non_first_candidate_to_the_front_in_the_full_prompt():
    from diffgr2_trl.rerank.prompts import build_prompt, parse_prompt, to_items
    from diffgr2_trl.rerank.traces import offline_completion

    sids = _Sids()
    rng = random.Random(0)
    rerank = []
    for _ in range(4):
        items = rng.sample(range(1, 60), 15)
        prompt = build_prompt(to_items(items[:5], sids.encode, sids.attribute_tokens),
                              to_items(items[5:], sids.encode, sids.attribute_tokens))
        rerank.append({"prompt": prompt, "completion": offline_completion(prompt, sids.encode(items[5]))})
    rows = build_midtraining_rows(_sequences(n_items=60), sids, 60, mix="promote=1", seed=5, rerank_rows=rerank)
    assert rows == build_midtraining_rows(_sequences(n_items=60), sids, 60, mix="promote=1", seed=5,
                                          rerank_rows=rerank)
    firsts = set()
    for r in rows:
        assert r["task"] == "promote" and r["prompt"] in {x["prompt"] for x in rerank}
        shown = [c.sid for c in parse_prompt(r["prompt"])[1]]
        parsed = parse_ranking(r["completion"], shown)
        assert parsed.valid, r["completion"]
        first = parsed.ranking[0]
        assert first != shown[0]  # every row needs a drop: the promoted item leaves its pre-rank slot
        assert parsed.ranking == [first] + [s for s in shown if s != first]
        assert first in r["completion"].split("recommendations")[0]  # the explanation names the promoted item
        firsts.add((r["prompt"], first))
    assert len(firsts) > 20  # promotions vary within a prompt, not only across prompts
    with pytest.raises(ValueError, match="'promote' task needs rerank_rows"):
        build_midtraining_rows(_sequences(n_items=60), sids, 3, mix="promote=1")
