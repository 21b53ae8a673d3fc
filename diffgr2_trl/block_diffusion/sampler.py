"""The block-diffusion sampler: blocks left to right, positions inside a block in parallel, exact KV cache.

One forward is one denoising step. Its input is the clean tokens not yet in the cache (the prompt, or the block
committed last) followed by the current block's canvas. The clean part is appended to the KV cache and yields
the logit that predicts the block's first token (token shift); the canvas part yields the predictions for the
other positions and is cropped off the cache after the forward. So committing a block costs no extra forward,
and the cache only ever holds committed tokens, exactly as training's clean stream sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .decoding import BlockDecodingConfig
from .masks import dense_mask, to_model_mask
from .objective import check_positions
from .spec import BlockDiffusionSpec, get_spec
from .wrappers import unwrap_model


@dataclass
class SamplerOutput:
    """What the sampler returns; every ``(batch, T)`` tensor is aligned with ``completion_ids``.

    Attributes:
        sequences: ``(batch, P + T)`` left-padded prompts followed by the completions.
        completion_ids: ``(batch, T)`` generated tokens (pad after the first stop token).
        canvas_ids: ``(batch, T)`` the tokens exactly as committed, including whatever sat after the first stop
            token inside its block (those were visible to the block's later steps; trajectory replay needs them).
        completion_mask: ``(batch, T)`` True up to and including the first stop token.
        step_map: denoising step *within its block* at which each token was committed (-1: never generated).
            Replaying a trajectory rebuilds the canvas of step ``k`` from the tokens with ``step_map < k``.
        confidences: probability the commit rule ranked the token by (top probability, or the sampled token's).
        logprobs: log-probability of the committed token under ``softmax(logits / temperature)``.
        forward_passes: batched forwards run.
        row_forward_passes: ``(batch,)`` forwards each row took part in before it finished.
        prompt_length: ``P``, the column where completions start.
    """

    sequences: torch.Tensor
    completion_ids: torch.Tensor
    canvas_ids: torch.Tensor
    completion_mask: torch.Tensor
    step_map: torch.Tensor
    confidences: torch.Tensor
    logprobs: torch.Tensor
    forward_passes: int
    row_forward_passes: torch.Tensor
    prompt_length: int

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, over the rows (the parallelism actually obtained)."""
        return float(self.completion_mask.sum()) / max(1.0, float(self.row_forward_passes.sum()))


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of token-id lists into ``(input_ids, attention_mask)``."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("Every prompt must hold at least one token.")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for r, s in enumerate(sequences):
        ids[r, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


class BlockDiffusionSampler:
    """Batched, left-padding aware parallel decoder for block-diffusion LMs.

    Args:
        model: a converted model (its config carries the block-diffusion spec) or any causal LM with ``spec``. May be
            None when every :meth:`generate` call passes ``model=`` (trainers hand in the current policy each time).
        spec: overrides the model's spec (e.g. another block size at decode time for experiments).
        config: the decoding settings (:class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`; default: its
            defaults). Keyword arguments of :meth:`generate` override them per call.
        pad_token_id / eos_token_id: default to the model config's. ``config.stop_token_ids`` add more stop tokens.
        use_cache: keep the exact KV cache of committed tokens (default). ``False`` recomputes the whole
            sequence every step: slow, but the reference the cache is tested against.

    Example:
        >>> sampler = BlockDiffusionSampler(model, config=BlockDecodingConfig(max_completion_length=128, tau=0.9))
        >>> out = sampler.generate(input_ids, attention_mask)
        >>> out.tokens_per_forward
    """

    def __init__(
        self,
        model=None,
        spec: BlockDiffusionSpec | None = None,
        *,
        config: BlockDecodingConfig | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        self.config = config if config is not None else BlockDecodingConfig()
        self._spec = spec
        self._pad_token_id = pad_token_id
        self._eos_token_id = eos_token_id
        self.use_cache = use_cache
        if model is not None:
            self._bind(model)

    def _bind(self, model) -> None:
        """Read the spec, special tokens and attention backend from ``model`` (the one the next forwards call)."""
        self.model = model
        spec = self._spec or get_spec(model)
        if spec.mask_token_id < 0:
            raise ValueError("The block-diffusion spec has no mask_token_id; convert the model first.")
        self.spec = spec
        config = unwrap_model(model).config
        self.pad_token_id = self._pad_token_id if self._pad_token_id is not None else config.pad_token_id
        eos = self._eos_token_id if self._eos_token_id is not None else config.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.attn_implementation = getattr(config, "_attn_implementation", "sdpa")
        if self.attn_implementation == "flex_attention":
            # Decode-time masks are tiny and change every step; the dense path is the right tool there.
            self.attn_implementation = "sdpa"

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        model=None,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> SamplerOutput:
        """Decode completions for a left-padded batch of prompts.

        Args:
            model: decode with this model instead of the one given at construction (e.g. the current policy).
            generator: the random generator for sampling (``temperature > 0``).
            **overrides: :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig` fields for this call only
                (``max_completion_length``, ``tau``, ``tokens_per_step``, ``temperature``, ``top_k``, ``block_size``,
                ``stop_token_ids``; ``max_new_tokens`` is a deprecated spelling of ``max_completion_length``).
        """
        if model is not None and model is not self.model:
            self._bind(model)
        if self.model is None:
            raise ValueError("BlockDiffusionSampler has no model: pass one at construction or generate(model=...).")
        cfg = self.config.replace(**overrides) if overrides else self.config
        spec = self.spec
        if cfg.block_size is not None and cfg.block_size != spec.block_size:
            spec = BlockDiffusionSpec.from_dict({**spec.to_dict(), "block_size": cfg.block_size})
        max_new_tokens, tau, tokens_per_step = cfg.max_completion_length, cfg.tau, cfg.tokens_per_step
        temperature, top_k, stop_token_ids = cfg.temperature, cfg.top_k, cfg.stop_token_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("Prompts must be left-padded (the last column must be real tokens for every row).")
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        pads = (~attention_mask).sum(-1)
        check_positions(self.model, (prompt_len + max_new_tokens - 1 - pads).unsqueeze(-1))
        stops = torch.tensor(sorted(set(self.eos_token_ids + list(stop_token_ids or []))), device=device, dtype=torch.long)

        total = prompt_len + max_new_tokens
        seq = torch.full((batch, total), self.pad_token_id, dtype=torch.long, device=device)
        seq[:, :prompt_len] = input_ids
        valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        valid[:, :prompt_len] = attention_mask
        step_map = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
        confidences = torch.zeros(batch, max_new_tokens, device=device)
        logprobs = torch.zeros(batch, max_new_tokens, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        position_all = (torch.arange(total, device=device)[None] - pads[:, None]).clamp_min(0)

        cache = DynamicCache() if self.use_cache else None
        self._masks: dict = {}
        cached = 0  # columns [0, cached) are in the KV cache
        forwards = 0
        end = prompt_len
        for start in range(prompt_len, total, spec.block_size):
            end = min(start + spec.block_size, total)
            width = end - start
            canvas = torch.full((batch, width), spec.mask_token_id, dtype=torch.long, device=device)
            canvas[finished] = self.pad_token_id
            seed_logits = None
            step = 0
            while True:
                masked = canvas == spec.mask_token_id
                if not masked.any():
                    break
                need = masked.any(0)  # block columns some row still has to predict
                if spec.token_shift and seed_logits is not None and not need[1:].any():
                    # Only the first position is left and its prediction comes from the committed context alone.
                    canvas_logits, cols = seed_logits[:, None, :][:, :0], []
                else:
                    new_seed, canvas_logits, cols, cached = self._forward(
                        seq, valid, position_all, canvas, start, prompt_len, cached, cache, need, spec
                    )
                    seed_logits = new_seed if new_seed is not None else seed_logits
                    forwards += 1
                    row_forwards += (~finished).long()
                if spec.token_shift and need[0]:
                    logits, cols = torch.cat([seed_logits[:, None], canvas_logits], 1), [0, *cols]
                else:
                    logits = canvas_logits
                self._commit(
                    logits, cols, canvas, masked, step, start - prompt_len, stops,
                    tau, tokens_per_step, temperature, top_k, generator, step_map, confidences, logprobs,
                )
                step += 1
            seq[:, start:end] = canvas
            finished |= torch.isin(canvas, stops).any(-1)
            if finished.all():
                break

        raw = seq[:, prompt_len:end]
        gen = raw
        t = gen.shape[1]
        is_stop = torch.isin(gen, stops)
        after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
        completion_mask = ~after_stop
        never = step_map[:, :t] < 0
        completion_mask &= ~never
        gen = gen.masked_fill(~completion_mask, self.pad_token_id)
        return SamplerOutput(
            sequences=torch.cat([input_ids, gen], 1),
            completion_ids=gen,
            canvas_ids=raw,
            completion_mask=completion_mask,
            step_map=step_map[:, :t],
            confidences=confidences[:, :t],
            logprobs=logprobs[:, :t],
            forward_passes=forwards,
            row_forward_passes=row_forwards,
            prompt_length=prompt_len,
        )

    # ------------------------------------------------------------------ internals
    def _forward(self, seq, valid, position_all, canvas, start, comp_start, cached, cache, need, spec):
        """One denoising forward. Returns ``(seed_logits, canvas_logits, cols, new_cached)``.

        ``seed_logits`` (batch, V) predicts the block's first token with token shift; it is None when this forward
        had no new clean tokens (later steps of a block reuse the first step's). ``canvas_logits`` (batch, len(cols),
        V) predict the block columns ``cols``: only those in ``need`` (still masked in some row), since the LM head
        over a large vocabulary is a real share of a small forward.
        """
        device = seq.device
        shift = spec.token_shift
        ctx = cached if self.use_cache else 0
        new_clean = start - ctx
        # With shift, the canvas's last column only matters as a key for the other canvas columns: a one-token
        # block needs no canvas at all (block size 1 is plain AR decoding).
        width = canvas.shape[1]
        canvas_in = width if (not shift or width > 1) else 0
        q_col = torch.cat([torch.arange(ctx, start, device=device), torch.arange(start, start + canvas_in, device=device)])
        q_stream = (q_col >= start).long()
        kv_col = torch.cat([torch.arange(ctx, device=device), q_col])
        kv_stream = torch.cat([torch.zeros(ctx, dtype=torch.long, device=device), q_stream])
        key = (ctx, start, canvas_in)
        if key not in self._masks:  # later steps of a block reuse the same pattern
            self._masks = {key: to_model_mask(dense_mask(
                q_stream, q_col, kv_stream, kv_col, valid[:, kv_col],
                comp_start=comp_start, block_size=spec.block_size, clean_block_causal=spec.clean_block_causal,
            ), self.attn_implementation, unwrap_model(self.model).dtype)}
        mask = self._masks[key]
        has_seed = shift and new_clean > 0
        cols = [j + int(shift) for j in range(canvas_in - int(shift)) if need[j + int(shift)]]
        keep = ([new_clean - 1] if has_seed else []) + [new_clean + c - int(shift) for c in cols]
        out = self.model(
            input_ids=torch.cat([seq[:, ctx:start], canvas[:, :canvas_in]], 1),
            attention_mask=mask,
            position_ids=position_all[:, q_col],
            past_key_values=cache,
            use_cache=self.use_cache,
            logits_to_keep=torch.tensor(keep, device=device, dtype=torch.long),
        )
        logits = out.logits.float()
        if self.use_cache:
            if canvas_in:
                cache.crop(-canvas_in)
            cached = start
        if has_seed:
            return logits[:, 0], logits[:, 1:], cols, cached
        return None, logits, cols, cached

    def _commit(
        self, logits, cols, canvas, masked, step, offset, stops,
        tau, tokens_per_step, temperature, top_k, generator, step_map, confidences, logprobs,
    ):
        """Pick tokens for the masked positions among block columns ``cols`` (``logits`` is ``(batch, len(cols),
        V)``) and commit per the schedule, in place on ``canvas`` and the records."""
        full_masked, masked = masked, masked[:, cols]
        logits[..., self.spec.mask_token_id] = float("-inf")
        scaled = logits / temperature if temperature > 0 else logits
        if temperature == 0:
            # Greedy: max and logsumexp give confidence and log-prob without materialising a softmax.
            top, tokens = logits.max(-1)
            tok_logp = top - torch.logsumexp(logits, -1)
            conf = tok_logp.exp()
        else:
            logp = torch.log_softmax(scaled, -1)
            filt = scaled
            if top_k is not None and top_k < filt.shape[-1]:
                kth = filt.topk(top_k, -1).values[..., -1:]
                filt = filt.masked_fill(filt < kth, float("-inf"))
            probs = torch.softmax(filt, -1)
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            tokens = flat.view(probs.shape[:-1])
            conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
            tok_logp = logp.gather(-1, tokens[..., None]).squeeze(-1)
        score = conf.masked_fill(~masked, -1.0)
        if tokens_per_step is not None:
            k = min(tokens_per_step, score.shape[1])
            commit = torch.zeros_like(masked).scatter_(1, score.topk(k, -1).indices, True) & masked
        else:
            commit = masked & (conf >= tau)
            best = score.argmax(-1, keepdim=True)
            commit.scatter_(1, best, True)
            commit &= masked
        sub = canvas[:, cols]
        sub[commit] = tokens[commit]
        canvas[:, cols] = sub
        span = slice(offset, offset + canvas.shape[1])
        for record, values in ((step_map, torch.full_like(tokens, step)), (confidences, conf), (logprobs, tok_logp)):
            region = record[:, span]
            chosen = region[:, cols]
            chosen[commit] = values[commit].to(chosen.dtype)
            region[:, cols] = chosen
        del full_masked
        # Everything after a committed stop token in this block is a stop token too: training fills the last block
        # with EOS after EOS, so this is the model's own prediction, committed without spending steps on it.
        if stops.numel() == 0:
            return
        is_stop = torch.isin(canvas, stops) & (canvas != self.spec.mask_token_id)
        after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
        fill = after & (canvas == self.spec.mask_token_id)
        if fill.any():
            canvas[fill] = stops[0]
            step_map[:, span][fill] = step
            confidences[:, span][fill] = 1.0
