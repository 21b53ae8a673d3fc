"""In-process Hugging Face teacher: one batched, no-grad forward per group of sequences."""

from __future__ import annotations

import inspect
import os

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..block_diffusion.likelihood import check_output_logits, output_logits
from .base import Teacher, TeacherScores

__all__ = ["HFTeacher"]


class HFTeacher(Teacher):
    """Score sequences with an in-process HF causal LM (batched, right-padded, attention-masked, no grad).

    The only backend that can return full-vocabulary log-probs (``full_vocab=True``), e.g. for a dense KL. They come
    back lazily: the final hidden states of the completion positions (``[Lc, H]`` in the model's dtype) and the
    function that turns any chunk of them into ``[c, V]`` float32 log-probs (:attr:`TeacherScores.full_head`), so a
    loss can read them a chunk of positions at a time: at a 152k vocabulary one position's float32 log-probs take
    0.6 MB, its hidden states a few KB.

    Args:
        model_or_path: a loaded ``PreTrainedModel`` (used as is, put in eval mode) or a checkpoint path / hub id.
        batch_size: sequences per forward. Sequences are sorted by length first so a batch wastes little padding.
        device: where to load a model from a path (default: cuda if available, else cpu). Ignored for a model.
        dtype: dtype to load a model from a path with (default float32, the precision teacher targets need).
        forbidden_token_ids: ids that must never reach the teacher (see :class:`Teacher`).
        progress: show a progress bar over batches.

    Returned log-probs are float32 and live on the model's device.
    """

    supports_full_vocab = True

    def __init__(
        self,
        model_or_path: PreTrainedModel | str | os.PathLike,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        forbidden_token_ids=None,
        progress: bool = False,
    ):
        super().__init__(forbidden_token_ids)
        if isinstance(model_or_path, PreTrainedModel):
            model = model_or_path
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype).to(device)
        self.model = model.eval()
        self.batch_size = batch_size
        self.progress = progress
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        # `logits_to_keep` (transformers >= 4.50) lets the LM head run on the completion slice only: for a 150k
        # vocabulary the full [B, L, V] logits would otherwise dominate memory.
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self._has_logits_to_keep:
            # Scores are computed from the final hidden states through the output layer and the forward's logit
            # post-processing: refuse a model whose post-processing that would not reproduce.
            check_output_logits(model)

    def full_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` float32 log-probs from final hidden states ``[..., H]`` (no gradient)."""
        with torch.no_grad():
            return torch.log_softmax(output_logits(self.model, hidden).float(), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def _score(self, sequences, starts, top_k, full_vocab) -> TeacherScores:
        n = len(sequences)
        token_lp: list[torch.Tensor | None] = [None] * n
        topk_ids: list[torch.Tensor | None] = [None] * n
        topk_lp: list[torch.Tensor | None] = [None] * n
        full: list[torch.Tensor | None] | None = [None] * n if full_vocab else None
        order = sorted(range(n), key=lambda i: len(sequences[i]), reverse=True)
        batches = [order[b : b + self.batch_size] for b in range(0, n, self.batch_size)]
        hidden: list[torch.Tensor | None] | None = [None] * n if full_vocab else None
        for batch in tqdm(batches, desc="HF teacher scoring", disable=not self.progress):
            lengths = [len(sequences[i]) for i in batch]
            width = max(lengths)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: positions stay 0..L-1 for every row
                ids[r, : lengths[r]] = torch.tensor(sequences[i])
                mask[r, : lengths[r]] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            if self._has_logits_to_keep:
                # The output layer runs per row below, on its completion positions only: the batch's [B, L, V]
                # logits are never built (`logits_to_keep=1` keeps one position per row).
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                                 output_hidden_states=True)
                states = out.hidden_states[-1]
            else:
                states = None
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, i in enumerate(batch):
                # Logits at position p predict token p+1, so the completion [start, L) needs positions [start-1, L-1).
                lo, hi = starts[i] - 1, lengths[r] - 1
                if states is not None:
                    logprobs = self.full_head(states[r, lo:hi])
                else:
                    logprobs = torch.log_softmax(logits[r, lo:hi].float(), dim=-1)
                target = torch.tensor(sequences[i][starts[i] :], device=logprobs.device)
                token_lp[i] = logprobs.gather(-1, target[:, None]).squeeze(-1)
                values, indices = logprobs.topk(top_k, dim=-1)
                topk_lp[i], topk_ids[i] = values, indices
                if full_vocab and states is not None:
                    hidden[i] = states[r, lo:hi].clone()  # a copy: the batch's [B, L, H] states are freed
                elif full is not None:
                    full[i] = logprobs
            del states
        if full_vocab and self._has_logits_to_keep:
            return TeacherScores(token_lp, topk_ids, topk_lp, None, full_hidden=hidden,  # type: ignore[arg-type]
                                 full_head=self.full_head)
        return TeacherScores(token_lp, topk_ids, topk_lp, full)  # type: ignore[arg-type]

    def tokenizer_path(self) -> str | None:
        """What the model was loaded from (``name_or_path``: a directory or a hub id), if recorded."""
        return getattr(self.model, "name_or_path", None) or None

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
