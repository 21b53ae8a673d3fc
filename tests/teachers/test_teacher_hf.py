"""HF teacher, input validation, vocabulary checks and the backend factory: no vLLM needed."""

from __future__ import annotations

import copy

import pytest
import torch

from diffgr2_trl.modeling import build_model, build_word_tokenizer
from diffgr2_trl.teachers import (
    HFTeacher,
    TeacherInputError,
    VLLMServerTeacher,
    VocabMismatchError,
    check_vocab_compatible,
    load_teacher,
)
from tests.helpers import WORDS


def _random_batch(vocab: int, lengths=(12, 30, 7, 50, 3), starts=(5, 10, 1, 49, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], list(starts)


def test_hf_teacher_matches_unbatched_forward(tiny_model):
    seqs, starts = _random_batch(tiny_model.config.vocab_size)
    teacher = HFTeacher(tiny_model, batch_size=2)
    scores = teacher.score(seqs, starts, top_k=4, full_vocab=True)
    assert len(scores) == len(seqs)
    for seq, start, tok_lp, ids, lp, full in zip(
        seqs, starts, scores.token_logprobs, scores.topk_ids, scores.topk_logprobs,
        [scores.full_logprobs_of(i) for i in range(len(seqs))]
    ):
        n = len(seq) - start
        assert tok_lp.shape == (n,) and ids.shape == (n, 4) and lp.shape == (n, 4) and full.shape == (n, teacher.vocab_size)
        with torch.no_grad():  # reference: one unpadded forward, AR shift by hand
            ref = torch.log_softmax(tiny_model(torch.tensor([seq])).logits[0].float(), -1)[start - 1 : len(seq) - 1]
        target = torch.tensor(seq[start:])
        torch.testing.assert_close(tok_lp, ref.gather(-1, target[:, None]).squeeze(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, ref.topk(4, -1).values, atol=1e-5, rtol=0)
        assert torch.equal(lp, full.gather(-1, ids))  # ids and values belong together


def test_empty_completion_and_empty_batch(tiny_model):
    teacher = HFTeacher(tiny_model)
    scores = teacher.score([[2, 5, 6]], [3], top_k=3)
    assert scores.token_logprobs[0].shape == (0,) and scores.topk_ids[0].shape == (0, 3)
    assert len(teacher.score([], [], top_k=3)) == 0


def test_mask_token_never_reaches_teacher(tiny_model, word_tokenizer):
    student_tok = copy.deepcopy(word_tokenizer)  # what conversion does: append a mask token at the end
    student_tok.add_special_tokens({"mask_token": "<mask>"})
    mask_id = student_tok.convert_tokens_to_ids("<mask>")
    forbidden = check_vocab_compatible(tiny_model.config.vocab_size, word_tokenizer, student_tok, mask_token_id=mask_id)
    assert forbidden == [mask_id] and mask_id >= tiny_model.config.vocab_size
    teacher = HFTeacher(tiny_model, forbidden_token_ids=forbidden)
    with pytest.raises(TeacherInputError, match="outside the teacher's vocabulary"):
        teacher.score([[2, 5, mask_id, 6]], [1])
    # A forbidden id inside the teacher's range (e.g. a mask token placed on a spare embedding row) is refused too.
    teacher = HFTeacher(tiny_model, forbidden_token_ids=[7])
    with pytest.raises(TeacherInputError, match="forbidden token id 7 at position 2"):
        teacher.score([[2, 5, 7, 6]], [1])


@pytest.mark.parametrize(
    "seqs, starts, kwargs, match",
    [
        ([[2, 5, 6]], [0], {}, "1 <= start <= len"),
        ([[2, 5, 6]], [4], {}, "1 <= start <= len"),
        ([[2, 5, -1]], [1], {}, "outside the teacher's vocabulary"),
        ([[2, 5, 6]], [1, 2], {}, "2 completion starts"),
        ([[2, 5, 6]], [1], {"top_k": 1000}, "exceeds the vocabulary size"),
        ([list(range(40)) * 60], [1], {}, "longer than the teacher's context"),
    ],
)
def test_score_input_errors(tiny_model, seqs, starts, kwargs, match):
    with pytest.raises(TeacherInputError, match=match):
        HFTeacher(tiny_model).score(seqs, starts, **kwargs)


def test_vocab_mismatch_errors(word_tokenizer):
    vocab = len(word_tokenizer)
    assert check_vocab_compatible(vocab, word_tokenizer, word_tokenizer) == []
    shuffled = build_word_tokenizer(list(reversed(WORDS)))
    with pytest.raises(VocabMismatchError, match="have another id in the student"):
        check_vocab_compatible(vocab, word_tokenizer, shuffled)
    with pytest.raises(VocabMismatchError, match="only 10 output rows"):
        check_vocab_compatible(10, word_tokenizer, word_tokenizer)
    fewer = build_word_tokenizer(WORDS[:-3])
    with pytest.raises(VocabMismatchError, match="fewer than the teacher's"):
        check_vocab_compatible(vocab, word_tokenizer, fewer)
    other_eos = build_word_tokenizer(WORDS)
    other_eos.eos_token = "sort"
    with pytest.raises(VocabMismatchError, match="eos_token_id differs"):
        check_vocab_compatible(vocab, word_tokenizer, other_eos)
    with pytest.raises(VocabMismatchError, match="is an ordinary teacher token"):
        check_vocab_compatible(vocab, word_tokenizer, word_tokenizer, mask_token_id=5)
    # a reserved special token shared by both vocabularies (a spare mask token) is allowed, and forbidden to the teacher
    spare = build_word_tokenizer(WORDS, extra_special_tokens=["<|mask|>"])
    spare_id = spare.convert_tokens_to_ids("<|mask|>")
    assert check_vocab_compatible(len(spare), spare, spare, mask_token_id=spare_id) == [spare_id]


def test_load_teacher_dispatch(tmp_path, word_tokenizer):
    build_model("qwen3", tokenizer=word_tokenizer).save_pretrained(tmp_path)
    assert isinstance(load_teacher(str(tmp_path), batch_size=2), HFTeacher)
    remote = load_teacher("http://127.0.0.1:9/v1", vocab_size=45)  # lazy: builds without a server
    assert isinstance(remote, VLLMServerTeacher) and remote.base_url == "http://127.0.0.1:9"
    remote.close()
