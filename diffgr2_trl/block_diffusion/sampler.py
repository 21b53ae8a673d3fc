"""The block-diffusion sampler: blocks left to right, positions inside a block in parallel, exact KV cache.

One forward is one denoising step. Its input is the clean tokens not yet in the cache (the prompt, or the block
committed last) followed by the current block's canvas. The clean part is appended to the KV cache and yields
the logit that predicts the block's first token (token shift); the canvas part yields the predictions for the
other positions and is cropped off the cache after the forward. So committing a block costs no extra forward,
and the cache only ever holds committed tokens, exactly as training's clean stream sees them.

Rows leave the forward when their block is done. A block's first forward runs every row still decoding (each appends
its committed block to the cache); its later forwards hold no clean tokens, only canvases, so they run on the rows
that still have a masked position, over those rows' slice of the cache (gathered once per set of rows, cropped back
after each forward, never written back: the canvas is not cached). Rows that stopped (EOS) are dropped from the cache
at the next block. The per-row arithmetic is the same whichever rows share a forward, so the output is that of the
lockstep batch, which is that of each row alone. Each row advancing to its next block on its own would keep the batch
full but needs one cache length per row, which transformers' caches do not have; ``results/decode_at_batch.md`` has
the measurement behind the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache

from .attention import cpu_gqa_attention
from .cache import cache_rows, crop_static, reserved_cache
from .constraints import DecodingConstraint, constrain_logits, keep_consistent, row_canvases
from .convert import check_full_attention
from .decoding import BlockDecodingConfig, resolve_deprecated
from .layout import apply_temperature, exclude_mask_token, packed_layout, source_index, stream_columns
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
        computed_row_forwards: rows summed over the forwards actually computed: ``row_forward_passes.sum()`` plus
            the rows a forward carried without need (a finished row before it leaves the cache, every row of the
            compiled path's fixed-shape forwards, the forwards a synced rank runs for the others). ``-1``: not counted.
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
    computed_row_forwards: int = -1

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, over the rows (the parallelism actually obtained)."""
        return float(self.completion_mask.sum()) / max(1.0, float(self.row_forward_passes.sum()))

    @property
    def row_tokens_per_forward(self) -> torch.Tensor:
        """``(batch,)`` each row's tokens (up to and including its stop token) per forward it took part in."""
        return self.completion_mask.sum(-1).float() / self.row_forward_passes.clamp(min=1).float()

    @property
    def tokens_per_computed_row_forward(self) -> float:
        """Generated tokens per row-forward actually computed: below ``tokens_per_forward`` by the wasted rows."""
        return float(self.completion_mask.sum()) / max(1.0, float(self.computed_row_forwards))


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


@dataclass
class _DecodeState:
    """Everything one :meth:`BlockDiffusionSampler.generate` call reads and writes while it decodes.

    ``seq`` / ``valid`` / ``positions`` are ``(batch, P + T)``; the records are ``(batch, T)``, aligned with the
    completion; ``canvas`` is the current block's ``(batch, width)`` and ``offset`` its first completion column.
    """

    seq: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    prompt_length: int
    step_map: torch.Tensor
    confidences: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor
    row_forwards: torch.Tensor
    cache: DynamicCache | StaticCache | None
    live: torch.Tensor  # the rows the cache holds, in its batch order (rows that stopped leave it)
    canvas: torch.Tensor | None = None
    offset: int = 0
    cached: int = 0  # columns [0, cached) are in the KV cache
    forwards: int = 0
    computed_rows: int = 0  # rows summed over the forwards run
    # The attention mask of the last (cached, start, width) layout, per set of rows: a block's later steps reuse it.
    masks: dict = field(default_factory=dict)
    # (rows, cache) of the last gathered cache slice: kept while the same rows step through a block.
    gathered: tuple | None = None

    def record(self, rows: torch.Tensor, cols: list[int], commit: torch.Tensor, tokens: torch.Tensor, step: int,
               confidence: torch.Tensor, logprob: torch.Tensor) -> None:
        """Write ``tokens`` where ``commit`` (all ``(len(rows), len(cols))``, over the batch rows ``rows`` and the block
        columns ``cols``) into the canvas and records."""
        if not cols:
            return
        r, c = commit.nonzero(as_tuple=True)
        row, col = rows[r], torch.tensor(cols, device=commit.device)[c]
        self.canvas[row, col] = tokens[r, c]
        col = col + self.offset
        self.step_map[row, col] = step
        self.confidences[row, col] = confidence[r, c].to(self.confidences.dtype)
        self.logprobs[row, col] = logprob[r, c].to(self.logprobs.dtype)


def _propose(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """A token for every position: ``(tokens, confidence, logprob)``, each ``logits.shape[:-1]``.

    Greedy (``temperature == 0``) takes the argmax, whose probability is its confidence. Sampling draws from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens; the confidence is the drawn
    token's probability under that filtered distribution, the log-probability is under the unfiltered one (what
    trajectory replay recomputes).
    """
    if temperature == 0:
        # max and logsumexp give confidence and log-prob without materialising a softmax over the vocabulary.
        top, tokens = logits.max(-1)
        logprob = top - torch.logsumexp(logits, -1)
        return tokens, logprob.exp(), logprob
    scaled = apply_temperature(logits, temperature)
    filtered = scaled
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, -1).values[..., -1:]
        filtered = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(filtered, -1)
    tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
    logprob = torch.log_softmax(scaled, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, confidence, logprob


def _select(confidence: torch.Tensor, masked: torch.Tensor, tau: float, tokens_per_step: int | None) -> torch.Tensor:
    """Which masked positions to commit this step (bool, like ``masked``).

    Fixed schedule: the ``tokens_per_step`` most confident. Threshold: every position with confidence ``>= tau``,
    plus the most confident one, so each step commits at least one token and decoding always terminates.
    """
    score = confidence.masked_fill(~masked, -1.0)
    if tokens_per_step is not None:
        k = min(tokens_per_step, score.shape[1])
        return torch.zeros_like(masked).scatter_(1, score.topk(k, -1).indices, True) & masked
    commit = masked & (confidence >= tau)
    commit.scatter_(1, score.argmax(-1, keepdim=True), True)
    return commit & masked


def _fill_after_stop(state: _DecodeState, stops: torch.Tensor, mask_token_id: int, step: int) -> None:
    """Commit every still-masked position after a committed stop token of the block as a stop token.

    Training fills the last block with EOS after EOS, so this is the model's own prediction, committed without
    spending steps on it (confidence 1, log-probability 0).
    """
    if stops.numel() == 0:
        return
    canvas = state.canvas
    is_stop = torch.isin(canvas, stops) & (canvas != mask_token_id)
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    fill = after & (canvas == mask_token_id)
    if fill.any():
        span = slice(state.offset, state.offset + canvas.shape[1])
        canvas[fill] = stops[0]
        state.step_map[:, span][fill] = step
        state.confidences[:, span][fill] = 1.0


def _is_sharded(model) -> bool:
    """Whether a forward of ``model`` is a collective: FSDP2 (DTensor parameters), FSDP1, DeepSpeed ZeRO-3."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in (model, unwrap_model(model))):
        return True
    return any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in model.parameters())


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over every rank of the default process group (a collective)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


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
        cache_implementation: ``"dynamic"`` (default) grows the cache as blocks are committed. ``"static"``
            preallocates it for prompt + ``max_completion_length`` tokens: every forward then attends over the same
            key length (unwritten and stale columns masked out), the layout torch.compile / CUDA graphs need.
        compile: with the static cache, run the model's forward through ``torch.compile`` (``True``: mode
            ``"reduce-overhead"``, i.e. CUDA graphs on a GPU; or a dict of ``torch.compile`` keyword arguments).
            Every step then computes logits for the whole canvas (fixed shapes), so graphs are reused.
        sync_ranks: keep every process of a ``torch.distributed`` group in step: a rank whose rows are done keeps
            issuing forwards (their outputs discarded, the decode state untouched) until every rank is done, so
            each rank runs the same number of forwards. Needed when the model is sharded (FSDP, DeepSpeed ZeRO-3),
            where every forward is a collective and a rank that stops early leaves the others waiting forever.
            ``None`` (default): on when a process group of more than one rank is initialised and the model's
            parameters are shards; ranks must then all call :meth:`generate` together, with the same
            ``max_completion_length`` and block size (the number of blocks is not synced).

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
        cache_implementation: str = "dynamic",
        compile: bool | dict = False,
        sync_ranks: bool | None = None,
    ) -> None:
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}.")
        if cache_implementation == "static" and not use_cache:
            raise ValueError("cache_implementation='static' needs use_cache=True.")
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static' (fixed shapes; a dynamic cache "
                             "would recompile at every length).")
        self.cache_implementation = cache_implementation
        self.compile = compile
        self.sync_ranks = sync_ranks
        self._compiled: dict = {}
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
        check_full_attention(config)
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
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        model=None,
        generator: torch.Generator | None = None,
        constraints: Sequence[DecodingConstraint | None] | None = None,
        **overrides,
    ) -> SamplerOutput:
        """Decode completions for a left-padded batch of prompts (no gradients).

        Args:
            input_ids, attention_mask: ``(batch, P)`` left-padded prompts (``attention_mask`` None: no padding).
            model: decode with this model instead of the one given at construction (e.g. the current policy).
            generator: the random generator for sampling (``temperature > 0``).
            constraints: one constraint per row (None: that row decodes freely), e.g.
                :class:`~diffgr2_trl.rerank.constraints.RankingConstraint`: proposals are masked to the allowed
                tokens and a commit stands only while the row stays completable (see
                :mod:`~diffgr2_trl.block_diffusion.constraints`). ``logprobs`` are then those of the masked
                distribution. None (the default) runs exactly the unconstrained sampler.
            **overrides: :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig` fields for this call only
                (``max_completion_length``, ``tau``, ``tokens_per_step``, ``temperature``, ``top_k``, ``block_size``,
                ``stop_token_ids``; ``max_new_tokens`` is a deprecated spelling of ``max_completion_length``).
        """
        # Resolved here, not in BlockDecodingConfig.replace, so the FutureWarning names the caller's line.
        overrides = resolve_deprecated(overrides, stacklevel=2)
        if model is not None and model is not self.model:
            self._bind(model)
        if self.model is None:
            raise ValueError("BlockDiffusionSampler has no model: pass one at construction or generate(model=...).")
        cfg = self.config.replace(**overrides) if overrides else self.config
        spec = self.spec
        if cfg.block_size is not None and cfg.block_size != spec.block_size:
            spec = BlockDiffusionSpec.from_dict({**spec.to_dict(), "block_size": cfg.block_size})
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("Prompts must be left-padded (the last column must be real tokens for every row).")
        with torch.no_grad(), cpu_gqa_attention(unwrap_model(self.model)):
            return self._decode(input_ids, attention_mask, cfg, spec, generator, constraints)

    # ------------------------------------------------------------------ internals
    def _decode(self, input_ids, attention_mask, cfg: BlockDecodingConfig, spec: BlockDiffusionSpec, generator,
                constraints=None):
        """Blocks left to right; inside a block, denoising steps until no position is masked."""
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        length = cfg.max_completion_length
        stops = torch.tensor(sorted(set(self.eos_token_ids + list(cfg.stop_token_ids or []))), device=device,
                             dtype=torch.long)
        seq, valid, positions = packed_layout(
            input_ids, attention_mask, torch.full((batch, length), self.pad_token_id, dtype=torch.long, device=device)
        )
        check_positions(self.model, positions)
        state = _DecodeState(
            seq=seq, valid=valid, positions=positions, prompt_length=prompt_len,
            step_map=torch.full((batch, length), -1, dtype=torch.long, device=device),
            confidences=torch.zeros(batch, length, device=device),
            logprobs=torch.zeros(batch, length, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            row_forwards=torch.zeros(batch, dtype=torch.long, device=device),
            cache=self._new_cache(prompt_len + length),
            live=torch.arange(batch, device=device),
        )
        if constraints is not None and len(constraints) != batch:
            raise ValueError(f"constraints has {len(constraints)} entries for a batch of {batch} rows (one per row).")
        constrained = [r for r, c in enumerate(constraints or []) if c is not None]
        shift = spec.token_shift
        total = prompt_len + length
        end = prompt_len
        sync = self._synced()

        def any_rank(flag: bool) -> bool:
            return _any_rank(flag, device) if sync else flag

        for start in range(prompt_len, total, spec.block_size):
            end = min(start + spec.block_size, total)
            state.offset = start - prompt_len
            state.canvas = torch.full((batch, end - start), spec.mask_token_id, dtype=torch.long, device=device)
            state.canvas[state.finished] = self.pad_token_id
            self._drop_finished(state)
            seed_logits = None  # with token shift: (batch, V), the block's first token's logits from the committed context
            step = 0
            while any_rank(bool((masked := state.canvas == spec.mask_token_id).any())):
                if not masked.any():  # synced: this rank is done, another is not; keep its collectives in step
                    self._forward(state, start, torch.ones(masked.shape[1], dtype=torch.bool, device=device), spec,
                                  state.live)
                    state.forwards += 1
                    continue
                rows = self._step_rows(state, masked, start)  # the rows this step commits in
                sub = masked[rows]  # (n, W)
                need = sub.any(0)  # block columns some of those rows still have to predict
                seeded = shift and seed_logits is not None
                forward_rows = rows
                if seeded and not self.compile:
                    # A row whose only masked position is the first takes its logits from the seed: no forward.
                    forward_rows = rows[sub[:, 1:].any(1)]
                if forward_rows.numel() == 0 or (seeded and not need[1:].any()):
                    # Only first positions are left and their prediction comes from the committed context alone.
                    canvas_logits, cols = seed_logits[rows][:, None, :][:, :0], []
                    if sync:  # the other ranks may run a forward at this step
                        self._forward(state, start, need, spec, rows)
                        state.forwards += 1
                else:
                    new_seed, canvas_logits, cols = self._forward(state, start, masked[forward_rows].any(0), spec,
                                                                  forward_rows)
                    if new_seed is not None:  # without a cache every forward recomputes it (the same values)
                        if seed_logits is None:
                            seed_logits = new_seed.new_zeros(batch, new_seed.shape[-1])
                        seed_logits.index_copy_(0, forward_rows, new_seed)
                    if forward_rows.numel() != rows.numel():  # the seeded rows' canvas columns are not eligible
                        canvas_logits = canvas_logits.new_zeros(rows.numel(), *canvas_logits.shape[1:]).index_copy_(
                            0, torch.searchsorted(rows, forward_rows), canvas_logits)
                    state.forwards += 1
                    state.row_forwards[forward_rows] += (~state.finished[forward_rows]).long()
                if shift and need[0]:
                    logits, cols = torch.cat([seed_logits[rows][:, None], canvas_logits], 1), [0, *cols]
                else:
                    logits = canvas_logits
                logits, eligible = exclude_mask_token(logits, spec.mask_token_id), sub[:, cols]
                row_list = rows.tolist()
                local = []  # constrained rows still decoding, as indices into this step's rows
                if constrained:
                    local = [i for i, r in enumerate(row_list) if constraints[r] is not None
                             and not bool(state.finished[r])]
                if local:
                    row_constraints = [constraints[r] for r in row_list]
                    positions = [state.offset + c for c in cols]
                    canvases = row_canvases(self._completion_so_far(state, spec)[rows], spec.mask_token_id, local)
                    logits, eligible = constrain_logits(logits, eligible, positions, canvases, row_constraints)
                tokens, confidence, logprob = _propose(logits, cfg.temperature, cfg.top_k, generator)
                commit = _select(confidence, eligible, cfg.tau, cfg.tokens_per_step)
                if local:
                    commit = keep_consistent(commit, tokens, confidence, positions, canvases, row_constraints)
                state.record(rows, cols, commit, tokens, step, confidence, logprob)
                _fill_after_stop(state, stops, spec.mask_token_id, step)
                step += 1
            state.seq[:, start:end] = state.canvas
            state.finished |= torch.isin(state.canvas, stops).any(-1)
            if not any_rank(not bool(state.finished.all())):
                break
        return self._output(state, input_ids, end, stops)

    def _drop_finished(self, state: _DecodeState) -> None:
        """At a block's start: forget the cached slice gathered for the last block and let the rows that stopped
        leave the cache (so no later forward computes them). The compiled path keeps its fixed batch; one row always
        stays, so a synced rank whose rows are all done still has something to run its collectives on."""
        state.gathered = None
        if not self.use_cache or self.compile:
            return
        keep = ~state.finished[state.live]
        if keep.all() or not keep.any():
            return
        state.cache = cache_rows(state.cache, keep.nonzero().squeeze(1))
        state.live = state.live[keep]

    def _step_rows(self, state: _DecodeState, masked: torch.Tensor, start: int) -> torch.Tensor:
        """The batch rows the next forward computes: every row the cache holds when the forward appends the last
        committed block to it (the block's first step), else only the rows with a position still masked."""
        if self.compile or (self.use_cache and state.cached < start):
            return state.live
        busy = masked.any(1)
        if self.use_cache and int(busy.sum()) == state.live.numel():
            return state.live
        return busy.nonzero().squeeze(1)

    def _synced(self) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        if torch.distributed.get_world_size() == 1:
            return False
        return self.sync_ranks if self.sync_ranks is not None else _is_sharded(self.model)

    def _new_cache(self, length: int):
        if not self.use_cache:
            return None
        if self.cache_implementation == "static":
            return StaticCache(config=unwrap_model(self.model).config, max_cache_len=length)
        return reserved_cache(length)

    def _model_forward(self):
        """The callable each step runs: the model, or its compiled forward (compiled once per model)."""
        if not self.compile:
            return self.model
        key = id(self.model)
        if key not in self._compiled:
            options = dict(mode="reduce-overhead", dynamic=False) if self.compile is True else dict(self.compile)
            self._compiled = {key: torch.compile(self.model, **options)}
        return self._compiled[key]

    @staticmethod
    def _completion_so_far(state: _DecodeState, spec: BlockDiffusionSpec) -> torch.Tensor:
        """``(batch, T)`` the completions as committed so far: earlier blocks, the current canvas, masks after it."""
        completion = state.seq[:, state.prompt_length :].clone()
        width = state.canvas.shape[1]
        completion[:, state.offset : state.offset + width] = state.canvas
        completion[:, state.offset + width :] = spec.mask_token_id
        return completion

    def _output(self, state: _DecodeState, input_ids, end: int, stops: torch.Tensor) -> SamplerOutput:
        """Cut the records to the columns decoded and pad everything after each row's first stop token."""
        raw = state.seq[:, state.prompt_length : end]
        t = raw.shape[1]
        is_stop = torch.isin(raw, stops)
        after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
        completion_mask = ~after_stop & (state.step_map[:, :t] >= 0)
        completion = raw.masked_fill(~completion_mask, self.pad_token_id)
        return SamplerOutput(
            sequences=torch.cat([input_ids, completion], 1),
            completion_ids=completion,
            canvas_ids=raw,
            completion_mask=completion_mask,
            step_map=state.step_map[:, :t],
            confidences=state.confidences[:, :t],
            logprobs=state.logprobs[:, :t],
            forward_passes=state.forwards,
            row_forward_passes=state.row_forwards,
            prompt_length=state.prompt_length,
            computed_row_forwards=state.computed_rows,
        )

    def _forward(self, state: _DecodeState, start: int, need: torch.Tensor, spec: BlockDiffusionSpec,
                 rows: torch.Tensor):
        """One denoising forward over the batch rows ``rows`` (ascending). Returns ``(seed_logits, canvas_logits,
        cols)``, over those rows.

        ``seed_logits`` (n, V) predicts the block's first token with token shift; it is None when this forward
        had no new clean tokens (later steps of a block reuse the first step's). ``canvas_logits`` (n, len(cols),
        V) predict the block columns ``cols``: only those in ``need`` (still masked in some row), since the LM head
        over a large vocabulary is a real share of a small forward. ``rows`` must be every row the cache holds
        (``state.live``) when the forward has clean tokens to append; otherwise a subset runs on its slice of the
        cache.
        """
        device = state.seq.device
        shift = int(spec.token_shift)
        static = self.cache_implementation == "static"
        ctx = state.cached if self.use_cache else 0  # columns the forward does not recompute
        # With shift, the canvas's last column only matters as a key for the other canvas columns: a one-token
        # block needs no canvas at all (block size 1 is plain AR decoding).
        width = state.canvas.shape[1]
        canvas_in = width if (not shift or width > 1) else 0
        q_stream, q_col, kv_stream, kv_col = stream_columns((ctx, start), (start, start + canvas_in), device=device)
        full = rows.numel() == state.seq.shape[0]
        valid = state.valid if full else state.valid[rows]
        kv_valid = valid[:, kv_col]
        if static:
            # The static cache holds column c at slot c and returns every slot: keys are all columns, those not
            # written yet (or holding an earlier step's canvas) are masked out.
            kv_col = torch.arange(state.valid.shape[1], device=device)
            kv_stream = ((kv_col >= start) & (kv_col < start + canvas_in)).long()
            kv_valid = valid & (kv_col < start + canvas_in)
        rows_key = tuple(rows.tolist())
        key = (ctx, start, canvas_in, rows_key)
        if key not in state.masks:
            if any(k[:3] != key[:3] for k in state.masks):
                state.masks = {}  # a new layout: the masks of the last one are not needed again
            state.masks[key] = to_model_mask(dense_mask(
                q_stream, q_col, kv_stream, kv_col, kv_valid,
                comp_start=state.prompt_length, block_size=spec.block_size,
                clean_block_causal=spec.clean_block_causal, q_offset=ctx if static else None,
            ), self.attn_implementation, unwrap_model(self.model).dtype)
        has_seed = bool(shift) and start > ctx
        # The compiled path keeps every canvas column (fixed shapes, so graphs are reused) and selects afterwards.
        cols = [c for c in range(shift, canvas_in) if need[c] or self.compile]
        # Queries are the clean columns [ctx, start) then the canvas: both offsets are shifted by the cached columns.
        predicted = torch.tensor(([0] if has_seed else []) + cols, dtype=torch.long, device=device) + start
        keep = source_index(predicted, state.prompt_length, spec,
                            noisy_offset=state.prompt_length - ctx, clean_offset=-ctx)
        cache = state.cache
        if self.use_cache and rows.numel() != state.live.numel():
            if start > ctx:
                raise RuntimeError("A forward that appends committed tokens to the cache must run every cached row.")
            if state.gathered is None or state.gathered[0] != rows_key:
                # ascending rows within ascending live rows: their places in the cache's batch
                # room for the canvas each step appends (and crops off again)
                state.gathered = (rows_key, cache_rows(state.cache, torch.searchsorted(state.live, rows),
                                                       spare=state.canvas.shape[1]))
            cache = state.gathered[1]
        seq, canvas, positions = ((state.seq, state.canvas, state.positions) if full else
                                  (state.seq[rows], state.canvas[rows], state.positions[rows]))
        out = self._model_forward()(
            input_ids=torch.cat([seq[:, ctx:start], canvas[:, :canvas_in]], 1),
            attention_mask=state.masks[key],
            position_ids=positions[:, q_col],
            past_key_values=cache,
            use_cache=self.use_cache,
            logits_to_keep=keep,
        )
        state.computed_rows += rows.numel()
        logits = out.logits.float()
        if self.compile:
            wanted = [i for i, c in enumerate(cols) if need[c]]
            logits = torch.cat([logits[:, :int(has_seed)], logits[:, int(has_seed):][:, wanted]], 1)
            cols = [cols[i] for i in wanted]
        if self.use_cache:
            if canvas_in:  # only committed (clean) tokens stay in the cache
                if static:
                    crop_static(cache, canvas_in)
                else:
                    cache.crop(-canvas_in)
            state.cached = start
        if has_seed:
            return logits[:, 0], logits[:, 1:], cols
        return None, logits, cols
