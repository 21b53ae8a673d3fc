"""A rule-based exact teacher for the sort task (``diffgr2_trl.synthetic``), wrapped as a ``Teacher``."""

from __future__ import annotations

import math

import torch

from diffgr2_trl.synthetic import sort_tokenizer
from diffgr2_trl.teachers import Teacher, TeacherScores


class SortRuleTeacher(Teacher):
    """Puts ``p_correct`` on the canonical next token of the sort completion (then EOS), the rest spread uniformly.

    Position-wise: completion position ``j`` is scored against the canonical completion's token ``j`` whatever the
    prefix, which is all the task needs (the canonical completion is fixed by the prompt).
    """

    supports_full_vocab = True

    def __init__(self, p_correct: float = 0.97, forbidden_token_ids=None):
        super().__init__(forbidden_token_ids)
        self.tokenizer = sort_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.p_correct = p_correct
        self.calls = 0

    def canonical(self, prompt_ids: list[int]) -> list[int]:
        words = self.tokenizer.convert_ids_to_tokens(prompt_ids)
        values = sorted(int(w) for w in words if w.isdigit())
        ordered = " ".join(map(str, values))
        ids = self.tokenizer(f"think {ordered} answer {ordered}", add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def _score(self, sequences, starts, top_k, full_vocab):
        self.calls += 1
        v = self.vocab_size
        low = math.log((1 - self.p_correct) / (v - 1))
        token_lp, ids, lps, full = [], [], [], []
        for seq, start in zip(sequences, starts):
            canon = self.canonical(seq[:start])
            n = len(seq) - start
            target = torch.tensor([canon[j] if j < len(canon) else self.tokenizer.eos_token_id for j in range(n)])
            logp = torch.full((n, v), low)
            logp[torch.arange(n), target] = math.log(self.p_correct)
            token_lp.append(logp.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0])
            top = logp.topk(top_k, -1) if top_k else (torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.long))
            lps.append(top[0])
            ids.append(top[1])
            full.append(logp)
        return TeacherScores(token_lp, ids, lps, full if full_vocab else None)
