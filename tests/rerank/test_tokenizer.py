"""Local BPE tokenizer: atomic SID/attribute/format tokens, a regular answer template, save/load round trip."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from diffgr2_trl.rerank.prompts import ItemText, build_prompt, format_completion
from diffgr2_trl.rerank.tokenizer import MASK_TOKEN, attr_tokens, sid_level_tokens, train_rerank_tokenizer


def _sid(rng):
    return "".join(f"<{lvl}_{rng.randrange(16)}>" for lvl in "abcd")


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        items = [ItemText(_sid(rng), tuple(f"<attr_{rng.randrange(20)}>" for _ in range(3))) for _ in range(25)]
        hist, cands = items[:15], items[15:]
        ranking = [c.sid for c in cands]
        rng.shuffle(ranking)
        rows.append(
            (build_prompt(hist, cands), format_completion(f'{ranking[0]} shares <attr_3>, a "good" fit', ranking))
        )
    return rows


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    texts = [t for row in corpus for t in row]
    return train_rerank_tokenizer(
        texts, sid_level_tokens(16), attr_tokens(20), vocab_size=600, out_dir=tmp_path_factory.mktemp("tok")
    )


def test_special_and_mask_tokens(tok):
    for t in ["<pad>", "<eos>", "<bos>", "<unk>", MASK_TOKEN]:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == "<unk>"
    assert tok.mask_token == MASK_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id}) == 5


def test_sids_are_four_tokens_and_answer_template_is_regular(tok, corpus):
    assert tok.tokenize("<a_3><b_15><c_0><d_7><attr_19>") == ["<a_3>", "<b_15>", "<c_0>", "<d_7>", "<attr_19>"]
    _, completion = corpus[0]
    pieces = tok.tokenize(completion)
    start = pieces.index('", "recommendations": ["')
    answer = pieces[start + 1 :]
    # 10 IDs x 4 level tokens, 9 one-token separators, one closing token: the same 50 slots for every ranking.
    assert len(answer) == 10 * 4 + 9 + 1 and answer[-1] == '"]}'
    assert [answer[i] for i in range(4, 49, 5)] == ['", "'] * 9
    assert pieces[0] == '{"explanation": "'
    for _, other in corpus[1:5]:
        other_pieces = tok.tokenize(other)
        assert len(other_pieces[other_pieces.index('", "recommendations": ["') :]) == 51


def test_round_trip_and_decoding_keeps_sids(tok, corpus):
    prompt, completion = corpus[1]
    for text in (prompt, completion, "ünïcode ☃ text\twith tabs"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    # TRL decodes completions with skip_special_tokens=True: SIDs and JSON pieces must survive, <eos> must not.
    ids = tok(completion + "<eos>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == completion


def test_save_pretrained_round_trip(tok, corpus, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt, completion = corpus[2]
    assert loaded(prompt + completion)["input_ids"] == tok(prompt + completion)["input_ids"]
    assert loaded.mask_token == MASK_TOKEN and loaded.eos_token == "<eos>" and len(loaded) == len(tok)
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi\nassistant: "
