"""GR2's RL for the AR teacher with rollouts sampled under the ranking constraint (``train-ar --rl_constrained``).

Why: a small teacher samples mostly invalid rankings at temperature 1, and an invalid rollout earns the same penalty
whatever it would have ranked, so most GRPO groups carry no ranking signal. Constrained, every rollout is a valid
permutation of its row's candidates and is scored by where it puts the target. Measured on the cpu preset's teacher
(``results/ar_rl_constrained.md``): every group informative, no ranking gain, and lower unconstrained validity, since
advantages that never separate valid from invalid answers push down correctly copied IDs half the time.

Importing this module imports TRL's trainer (seconds); :func:`~diffgr2_trl.rerank.ar.run_grpo` imports it on demand.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from .constraints import RankingConstraint, RankingLogitsProcessor

__all__ = ["ConstrainedRolloutGRPOTrainer"]


class ConstrainedRolloutGRPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose rollouts are sampled under
    :class:`~diffgr2_trl.rerank.constraints.RankingLogitsProcessor`: the explanation stays free, the answer is always a
    permutation of the row's ``candidates`` (a dataset column).

    Only generation changes. The loss is TRL's: log-probabilities are the policy's own (unconstrained) ones, so the
    update also raises the probability of the valid tokens sampled in rollouts with a positive advantage. Generation
    runs through ``model.generate`` (no vLLM, no tools, text prompts).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_vllm or getattr(self, "tools", None) or self.rollout_func is not None:
            raise ValueError("rl_constrained: constrained rollouts run through model.generate; use_vllm, tools "
                             "and rollout_func are not supported with it.")
        if "candidates" not in (self.train_dataset.column_names or []):
            raise ValueError("rl_constrained: the training dataset needs a 'candidates' column (the SIDs a "
                             "ranking must permute).")
        self._rollout_candidates: list[list[str]] = []

    def _generate_and_score_completions(self, inputs):
        self._rollout_candidates = [list(x["candidates"]) for x in inputs]
        return super()._generate_and_score_completions(inputs)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None and any(i is not None for i in images) or multimodal_fields:
            raise ValueError("rl_constrained: multimodal prompts are not supported.")
        if len(prompt_ids) != len(self._rollout_candidates):
            raise RuntimeError(f"rl_constrained: {len(prompt_ids)} prompts but {len(self._rollout_candidates)} "
                               "candidate lists in the batch.")
        stops = list(self.eos_token_ids)
        constraints = RankingConstraint.for_rows(self.processing_class, self._rollout_candidates,
                                                 self.max_completion_length, stops)
        width = max(len(p) for p in prompt_ids)
        pad_id = self.processing_class.pad_token_id
        ids = torch.full((len(prompt_ids), width), stops[0] if pad_id is None else pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompt_ids):  # left padding, as TRL's own generation path
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        device = self.accelerator.device
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
        ):
            out = unwrapped_model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=self.generation_config,
                logits_processor=LogitsProcessorList([RankingLogitsProcessor(constraints, width)]))
        completions = []
        for row in out[:, width:].tolist():  # up to and including the first stop token, as TRL keeps them
            end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
            completions.append(row[: end + 1])
        return completions, None
