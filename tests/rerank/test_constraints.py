"""Constrained answer decoding: random candidates and random logits never give an invalid ranking or a dead end."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgr2_trl.rerank.constraints import MASKED, RankingConstraint, RankingLogitsProcessor, feasible_candidates

# token ids: 0 eos, 1 head, 2 opener, 3 sep, 4 close, 5 mask, 6..9 free words, 10.. SID tokens
EOS, HEAD, OPEN, SEP, CLOSE, MASK = range(6)
VOCAB = 40


def make(cands, max_length):
    return RankingConstraint(cands, explanation_open=[HEAD], recommendations_open=[OPEN], separator=[SEP],
                             close=[CLOSE], stop_token_ids=[EOS], max_length=max_length, banned_in_explanation=[MASK])


def answer_of(constraint, canvas):
    """The ranking (candidate indices) a finished canvas spells, or raise AssertionError."""
    assert canvas[0] == HEAD
    o = canvas.index(OPEN)
    assert all(t not in (OPEN, SEP, CLOSE, EOS, MASK) for t in canvas[1:o]), canvas
    ranking, p = [], o + 1
    for i in range(constraint.n):
        sid = tuple(canvas[p : p + constraint.width])
        assert sid in constraint.candidates, (sid, canvas)
        ranking.append(constraint.candidates.index(sid))
        p += constraint.width
        assert canvas[p] == (SEP if i < constraint.n - 1 else CLOSE), canvas
        p += 1
    assert canvas[p] == EOS
    assert sorted(ranking) == list(range(constraint.n)), "not a permutation"
    return ranking


candidate_sets = st.integers(1, 3).flatmap(lambda width: st.lists(
    st.tuples(*[st.integers(10, 13)] * width), min_size=1, max_size=6, unique=True))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(cands=candidate_sets, slack=st.integers(0, 6), seed=st.integers(0, 10**6))
def test_left_to_right_decoding_always_gives_a_permutation(cands, slack, seed):
    c = make(cands, max_length=1 + (len(cands) * (len(cands[0]) + 1) + 2) + slack)
    g = torch.Generator().manual_seed(seed)
    canvas = []
    while not canvas or canvas[-1] != EOS:
        assert len(canvas) < c.max_length, "ran out of budget"
        allowed = c.allowed(canvas + [MASKED], len(canvas)).vocab_mask(VOCAB)
        assert allowed.any(), f"dead end at {canvas}"
        logits = torch.randn(VOCAB, generator=g).masked_fill(~allowed, float("-inf"))
        canvas.append(int(logits.argmax()))
    answer_of(c, canvas)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(cands=candidate_sets, slack=st.integers(0, 8), block=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_parallel_commits_in_any_order_never_dead_end(cands, slack, block, seed):
    """The block sampler's protocol: each step proposes a token per masked position of the block from its allowed set
    (against the committed state), then commits them in random order, each only if the canvas stays consistent."""
    rng = random.Random(seed)
    c = make(cands, max_length=1 + (len(cands) * (len(cands[0]) + 1) + 2) + slack)
    canvas = [MASKED] * c.max_length
    for start in range(0, c.max_length, block):
        span = range(start, min(start + block, c.max_length))
        if EOS in canvas[:start]:
            break
        while any(canvas[p] == MASKED for p in span):
            proposals = []
            for p in span:
                if canvas[p] == MASKED:
                    allowed = c.allowed(canvas, p)
                    tokens = sorted(allowed.only) if allowed.only is not None else [t for t in range(VOCAB) if t in allowed]
                    if tokens:
                        proposals.append((p, rng.choice(tokens)))
            assert proposals, f"dead end in block {start}: {canvas}"
            rng.shuffle(proposals)
            committed = 0
            for p, t in proposals:
                canvas[p] = t
                if c.consistent(canvas):
                    committed += 1
                else:
                    canvas[p] = MASKED
            assert committed, "no proposal could be committed"
            if EOS in canvas[start : span.stop]:  # the sampler fills the rest of the block after a stop token
                e = canvas.index(EOS, start)
                for p in range(e + 1, span.stop):
                    canvas[p] = EOS if canvas[p] == MASKED else canvas[p]
    answer_of(c, canvas[: canvas.index(EOS) + 1])


def test_matching_not_greedy():
    # Slot 0 holds level-0 token 10 (candidates A or B); slot 1 holds 10 as well: {A, B} shared by two slots, so the
    # third slot must take C although C's first token would also... be allowed greedily for no one.
    cands = [(10, 20), (10, 21), (11, 22)]
    c = make(cands, max_length=30)
    canvas = [HEAD, OPEN, 10, MASKED, SEP, 10, MASKED, SEP, MASKED, MASKED, CLOSE, EOS] + [MASKED] * 18
    assert c.consistent(canvas)
    assert c.allowed(canvas, 8).only == frozenset({11})  # a greedy per-slot check would also allow 10
    assert c.allowed(canvas, 3).only == frozenset({20, 21})
    canvas[3] = 21
    assert c.allowed(canvas, 6).only == frozenset({20})
    canvas[8] = 10
    assert not c.consistent(canvas)


def test_feasible_candidates_reports_only_edges_in_a_perfect_matching():
    assert feasible_candidates([[0, 1], [0], [1, 2]], 3) == [{1}, {0}, {2}]
    assert feasible_candidates([[0], [0]], 2) is None
    assert feasible_candidates([[0, 1], [0, 1]], 2) == [{0, 1}, {0, 1}]


def test_budget_forces_the_answer():
    c = make([(10,), (11,)], max_length=8)  # head + opener + 2 ids + sep + close + eos = 7: one explanation token
    assert c.latest_opener == 2
    assert c.allowed([HEAD, MASKED], 1).only is None  # explanation word, or the opener
    assert OPEN in c.allowed([HEAD, MASKED], 1)
    assert c.allowed([HEAD, 6, MASKED], 2).only == frozenset({OPEN})
    assert c.allowed([HEAD, MASKED, MASKED, MASKED], 3).only == frozenset()  # wait: the opener is not placed yet


def test_explanation_bans_structure_and_stop_tokens():
    c = make([(10,), (11,)], max_length=20)
    allowed = c.allowed([HEAD, MASKED], 1)
    for t in (EOS, HEAD, SEP, CLOSE, MASK):
        assert t not in allowed
    assert 6 in allowed and 10 in allowed  # free words and SID tokens (the explanation cites IDs)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="cannot hold the answer"):
        make([(10,), (11,)], max_length=6)
    with pytest.raises(ValueError, match="same non-zero number of tokens"):
        make([(10,), (11, 12)], max_length=30)
    with pytest.raises(ValueError, match="distinct"):
        make([(10,), (10,)], max_length=30)


def test_logits_processor_masks_per_row():
    c = make([(10,), (11,)], max_length=12)
    proc = RankingLogitsProcessor([c, None], prompt_length=2)
    ids = torch.tensor([[7, 7, HEAD, OPEN], [7, 7, HEAD, OPEN]])
    scores = proc(ids, torch.zeros(2, VOCAB))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [10, 11]
    assert torch.isfinite(scores[1]).all()
    with pytest.raises(ValueError, match="one per row"):
        proc(ids[:1], torch.zeros(1, VOCAB))


# --- with the real answer template, tokenizer and a random model ------------------------------------------------
@pytest.fixture(scope="module")
def rerank_setup(tmp_path_factory):
    from diffgr2_trl.modeling import build_model
    from diffgr2_trl.rerank.prompts import ItemText, build_prompt, format_completion
    from diffgr2_trl.rerank.tokenizer import attr_tokens, sid_level_tokens, train_rerank_tokenizer

    rng = random.Random(0)

    def sid():
        return "".join(f"<{lvl}_{rng.randrange(16)}>" for lvl in "abcd")

    rows, texts = [], []
    for _ in range(12):
        items = [ItemText(sid(), (f"<attr_{rng.randrange(20)}>",)) for _ in range(16)]
        hist, cands = items[:6], items[6:]
        prompt = build_prompt(hist, cands)
        rows.append((prompt, [c.sid for c in cands]))
        texts += [prompt, format_completion(f"{cands[0].sid} fits", [c.sid for c in cands])]
    tok = train_rerank_tokenizer(texts, sid_level_tokens(16), attr_tokens(20), vocab_size=400)
    model = build_model("qwen3", tokenizer=tok, shape="tiny", seed=0).eval()
    return tok, model, rows


def test_ar_generate_with_the_processor_is_always_valid_on_a_random_model(rerank_setup):
    from transformers import LogitsProcessorList

    from diffgr2_trl.rerank.parsing import parse_ranking

    tok, model, rows = rerank_setup
    max_new = 70  # head + 10 IDs x 5 + opener/close/eos: room for ~14 explanation tokens
    tok.padding_side = "left"
    enc = tok([p for p, _ in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    constraints = [RankingConstraint.from_tokenizer(tok, cands, max_new) for _, cands in rows]
    proc = RankingLogitsProcessor(constraints, enc["input_ids"].shape[1])
    for sample in (False, True):
        torch.manual_seed(0)
        out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]), max_new_tokens=max_new,
                             do_sample=sample, top_k=None, top_p=None, temperature=1.0 if sample else None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        results = [parse_ranking(t, cands) for t, (_, cands) in zip(texts, rows)]
        assert all(r.valid for r in results), [(r.error, t) for r, t in zip(results, texts) if not r.valid]
    plain = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not any(parse_ranking(t, c).valid for t, (_, c) in zip(texts, rows))  # the constraint does the work


@pytest.fixture(scope="module")
def block_setup(rerank_setup):
    import copy

    from diffgr2_trl.block_diffusion import convert_to_block_diffusion, left_pad

    tok, model, rows = rerank_setup
    tok = copy.deepcopy(tok)
    student = copy.deepcopy(model)
    convert_to_block_diffusion(student, tok, block_size=8)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in rows]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    return tok, student.eval(), rows, prompts, ids, mask


@pytest.mark.parametrize("schedule", [dict(tau=0.9), dict(tokens_per_step=3), dict(temperature=1.0, tau=0.5)])
def test_block_sampler_with_constraints_is_always_valid_on_a_random_model(block_setup, schedule):
    from diffgr2_trl.block_diffusion import BlockDiffusionSampler
    from diffgr2_trl.rerank.parsing import parse_ranking

    tok, model, rows, _, ids, mask = block_setup
    max_new = 72
    constraints = [RankingConstraint.from_tokenizer(tok, cands, max_new) for _, cands in rows]
    sampler = BlockDiffusionSampler(model)
    gen = torch.Generator().manual_seed(0)
    out = sampler.generate(ids, mask, max_completion_length=max_new, constraints=constraints, generator=gen, **schedule)
    texts = tok.batch_decode(out.completion_ids.masked_fill(~out.completion_mask, tok.pad_token_id),
                             skip_special_tokens=True)
    results = [parse_ranking(t, cands) for t, (_, cands) in zip(texts, rows)]
    assert all(r.valid for r in results), [(r.error, t) for r, t in zip(results, texts) if not r.valid]
    assert out.tokens_per_forward > 1.0  # still parallel


def test_block_sampler_constraints_do_not_depend_on_the_batch(block_setup):
    from diffgr2_trl.block_diffusion import BlockDiffusionSampler, left_pad

    tok, model, rows, prompts, ids, mask = block_setup
    max_new = 72
    constraints = [RankingConstraint.from_tokenizer(tok, cands, max_new) for _, cands in rows]
    sampler = BlockDiffusionSampler(model)
    batch = sampler.generate(ids, mask, max_completion_length=max_new, constraints=constraints, tau=0.7)
    # forced answer tokens fill blocks at different steps per row: rows leave the forward, the output stays per row
    assert batch.computed_row_forwards < batch.forward_passes * len(rows)
    for r in (0, 5):
        one_ids, one_mask = left_pad([prompts[r]], tok.pad_token_id)
        alone = sampler.generate(one_ids, one_mask, max_completion_length=max_new, constraints=[constraints[r]], tau=0.7)
        n = int(alone.completion_mask.sum())
        assert torch.equal(alone.completion_ids[0, :n], batch.completion_ids[r, :n])
        assert int(batch.completion_mask[r].sum()) == n
    # None everywhere is the unconstrained sampler, bit for bit
    free = sampler.generate(ids, mask, max_completion_length=max_new, tau=0.7)
    nones = sampler.generate(ids, mask, max_completion_length=max_new, tau=0.7, constraints=[None] * len(rows))
    assert torch.equal(free.canvas_ids, nones.canvas_ids) and torch.equal(free.logprobs, nones.logprobs)
    with pytest.raises(ValueError, match="one per row"):
        sampler.generate(ids, mask, max_completion_length=max_new, constraints=constraints[:2])


def test_for_rows_closes_with_eos_and_refuses_no_stop_token(rerank_setup):
    tok, _, rows = rerank_setup
    other = tok.pad_token_id
    assert other is not None and other < tok.eos_token_id, "the check needs a stop id that sorts before EOS"
    # EOS first whatever the set's order, so every row's answer ends with the token consumers strip
    built = RankingConstraint.for_rows(tok, [c for _, c in rows[:3]], 70, {other, tok.eos_token_id})
    assert [c.eos for c in built] == [tok.eos_token_id] * 3
    # a decoder that does not stop at EOS closes with its own first stop token
    assert RankingConstraint.for_rows(tok, [rows[0][1]], 70, [other])[0].eos == other
    with pytest.raises(ValueError, match="stop token"):
        RankingConstraint.for_rows(tok, [rows[0][1]], 70, [])


def test_evaluate_model_constrained_with_both_decoders(rerank_setup, block_setup):
    from diffgr2_trl.rerank.evaluate import ar_greedy_decode, evaluate_model, make_block_decode

    tok, ar_model, rows = rerank_setup
    data = [{"prompt": p, "candidates": c, "target": c[3]} for p, c in rows]
    for model, decode in ((ar_model, ar_greedy_decode), (block_setup[1], make_block_decode(tau=0.7))):
        free = evaluate_model(model, block_setup[0], data, decode, batch_size=6, max_new_tokens=72, progress=False)
        held = evaluate_model(model, block_setup[0], data, decode, batch_size=6, max_new_tokens=72, progress=False,
                              constrained=True)
        assert held["metrics"]["valid_rate"] == 1.0 and free["metrics"]["valid_rate"] < 1.0

    def plain(model, tokenizer, prompts, max_new_tokens):
        return ["x"] * len(prompts), {}

    with pytest.raises(ValueError, match="does not support constrained decoding"):
        evaluate_model(ar_model, tok, data, plain, constrained=True, progress=False)


def test_nothing_is_written_onto_the_tokenizer_and_the_matching_cache_is_bounded(monkeypatch):
    """The JSON-unsafe ids are cached beside the tokenizer (weakly), not on it; a constraint's matching cache stays
    under its bound however many states a decode visits, and stays correct after it starts over."""
    from diffgr2_trl.block_diffusion import constraints as core
    from diffgr2_trl.rerank import constraints as task
    from diffgr2_trl.synthetic import sort_tokenizer

    assert task.Allowed is core.Allowed and task.MASKED is core.MASKED  # the protocol is the core's, defined once
    tok = sort_tokenizer()
    before = dict(vars(tok))
    unsafe = task.json_unsafe_tokens(tok)
    assert vars(tok).keys() == before.keys() and task.json_unsafe_tokens(tok) is unsafe
    monkeypatch.setattr(task, "_FEASIBLE_CACHE_SIZE", 3)
    c = make([[10, 11], [12, 13], [14, 15]], max_length=16)
    free = [MASKED, MASKED]
    states = [((10, 11), tuple(free), tuple(free)), ((12, 13), tuple(free), tuple(free)),
              ((14, 15), tuple(free), tuple(free)), (tuple(free), (10, 11), tuple(free)),
              ((10, 11), (12, 13), tuple(free))]
    for slots in states + states:
        assert c._feasible(slots) is not None
        assert len(c._feasible_cache) <= 3
    assert c._feasible(((10, 11), (10, 11), tuple(free))) is None  # two slots, one item: infeasible, cached or not


def test_generate_command_constrained_writes_valid_rankings(block_setup, tmp_path):
    """``diffgr2 generate --constrained`` reads each prompt's candidates and closes the answer as evaluate does."""
    from diffgr2_trl.commands import generate
    from diffgr2_trl.rerank.parsing import parse_ranking

    tok, model, rows, *_ = block_setup
    model.save_pretrained(tmp_path / "bd")
    tok.save_pretrained(tmp_path / "bd")
    prompts = [p for p, _ in rows[:3]]
    argv = ["--model_name_or_path", str(tmp_path / "bd"), "--constrained", "--tau", "0.9", "--max_completion_length",
            "72", *[a for p in prompts for a in ("--prompt", p)]]
    texts = generate.run(*generate.parse(argv))
    assert all(parse_ranking(t, cands).valid for t, (_, cands) in zip(texts, rows)), [
        (parse_ranking(t, cands).error, t[-300:]) for t, (_, cands) in zip(texts, rows)]
    free = generate.run(*generate.parse([a for a in argv if a != "--constrained"]))
    assert not any(parse_ranking(t, cands).valid for t, (_, cands) in zip(free, rows))  # the constraint does it
