"""How the block sampler decodes: one dataclass, declared once, embedded everywhere decoding is configured.

:class:`BlockDecodingConfig` is what :class:`~diffgr2_trl.block_diffusion.BlockDiffusionSampler` takes. The trainer
configs (:class:`~diffgr2_trl.OnPolicyDistillationConfig`, :class:`~diffgr2_trl.DiffusionGRPOConfig`) inherit its
fields, and so do the ``generate`` / ``evaluate`` command arguments, so each decoding option is declared and checked
in this one place. Where a TRL base config already declares a field (``temperature``, ``top_k``,
``max_completion_length`` in ``GRPOConfig``), TRL's declaration and default win and keep their TRL meaning;
:meth:`BlockDecodingConfig.from_config` reads them the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError

DECODING_FIELDS = ("max_completion_length", "tau", "tokens_per_step", "temperature", "top_k", "block_size",
                   "stop_token_ids")


@dataclass
class BlockDecodingConfig:
    r"""Decoding settings of the block-diffusion sampler.

    Parameters that control the length:

        max_completion_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens generated per completion.
        stop_token_ids (`list[int]` or `None`, *optional*, defaults to `None`):
            Token ids that end a completion, in addition to the model's EOS token(s).

    Parameters that control the parallel schedule:

        block_size (`int` or `None`, *optional*, defaults to `None`):
            Decode with this block size instead of the one the model was trained with. A smaller one decodes each
            trained block in *sub-blocks*, left to right (Fast-dLLM v2's sub-blocks, without its stale cache of the
            block's later positions): a step's forward covers only the active sub-block, and each finished sub-block
            joins the exact KV cache as committed tokens. Where a forward costs what its query tokens cost (a CPU at
            batch > 1) that is what makes block decoding faster than AR; the model sees fewer masked positions than
            in training, so measure accuracy with it (``results/decode_bench.md``, ``scripts/measure_sub_blocks.py``).
        tau (`float`, *optional*, defaults to `0.9`):
            Confidence threshold in (0, 1]: each denoising step commits every masked position of the block whose
            confidence is at least ``tau``, plus the most confident one, so every step makes progress. Ignored when
            ``tokens_per_step`` is set.
        tokens_per_step (`int` or `None`, *optional*, defaults to `None`):
            Fixed schedule: commit the ``tokens_per_step`` most confident positions per step.

    Parameters that control sampling:

        temperature (`float`, *optional*, defaults to `0.0`):
            ``0`` decodes greedily; otherwise tokens are sampled from ``softmax(logits / temperature)``.
        top_k (`int` or `None`, *optional*, defaults to `None`):
            Sample among the ``top_k`` most likely tokens only. ``None`` or ``0`` disables the filter.
    """

    max_completion_length: int = field(default=128, metadata={"help": "Maximum tokens generated per completion."})
    tau: float = field(default=0.9, metadata={"help": "Sampler confidence threshold in (0, 1]."})
    tokens_per_step: int | None = field(default=None, metadata={"help": "Fixed commits per step (overrides tau)."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k filter when sampling (None or 0: off)."})
    block_size: int | None = field(default=None, metadata={"help": "Decode-time block size; smaller than the trained one: sub-blocks (None: the model's)."})
    stop_token_ids: list[int] | None = field(default=None, metadata={"help": "Extra stop token ids besides EOS."})

    def __post_init__(self) -> None:
        self.check_decoding()

    def check_decoding(self) -> None:
        """Raise ``ValueError`` naming the first decoding field out of range (trainer configs call it too)."""
        if self.max_completion_length is None or self.max_completion_length <= 0:
            raise OptionError("max_completion_length", f"must be a positive integer, got {self.max_completion_length!r}.")
        if self.tokens_per_step is None:
            if self.tau is None or not 0.0 < self.tau <= 1.0:
                raise OptionError("tau", f"must be in (0, 1], got {self.tau!r}.")
        elif self.tokens_per_step <= 0:
            raise OptionError("tokens_per_step", f"must be a positive integer, got {self.tokens_per_step!r}.")
        if self.temperature is None or self.temperature < 0:
            raise OptionError("temperature", f"must be >= 0, got {self.temperature!r}.")
        if self.top_k is not None and self.top_k < 0:
            raise OptionError("top_k", f"must be >= 0 (0 or None: off), got {self.top_k!r}.")
        if self.block_size is not None and self.block_size <= 0:
            raise OptionError("block_size", f"must be a positive integer, got {self.block_size!r}.")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> BlockDecodingConfig:
        """The decoding settings held by ``config`` (any object with these attributes, e.g. a trainer config), with
        ``overrides`` applied. Missing attributes take this class's defaults; ``top_k=0`` (TRL's "off") becomes None.
        """
        values = {name: getattr(config, name) for name in DECODING_FIELDS if hasattr(config, name)}
        values.update(overrides)
        if values.get("top_k") == 0:
            values["top_k"] = None
        if values.get("stop_token_ids") is not None:
            values["stop_token_ids"] = list(values["stop_token_ids"])
        return cls(**values)

    def replace(self, **overrides: Any) -> BlockDecodingConfig:
        """A copy with ``overrides`` applied (checked). ``max_new_tokens`` is accepted, deprecated, for
        ``max_completion_length``."""
        overrides = resolve_deprecated(overrides, stacklevel=2)
        unknown = sorted(set(overrides) - set(DECODING_FIELDS))
        if unknown:
            raise TypeError(f"Unknown decoding option(s) {unknown}; BlockDecodingConfig has {list(DECODING_FIELDS)}.")
        return BlockDecodingConfig.from_config(self, **overrides)


def resolve_deprecated(overrides: dict[str, Any], *, stacklevel: int) -> dict[str, Any]:
    """``overrides`` with deprecated option names mapped to the current ones (``max_new_tokens`` ->
    ``max_completion_length``; the current name wins when both are given).

    Each deprecated name used emits a ``FutureWarning`` attributed ``stacklevel`` frames up from the function that
    calls this one (``stacklevel=2``: that function's caller), so the warning names the user's line, not ours.
    """
    if "max_new_tokens" not in overrides:
        return overrides
    overrides = dict(overrides)
    value = overrides.pop("max_new_tokens")
    if value is not None:
        warnings.warn("max_new_tokens is deprecated; use max_completion_length (TRL's name).", FutureWarning,
                      stacklevel=stacklevel + 1)
        overrides.setdefault("max_completion_length", value)
    return overrides
