"""Combine :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig` with a TRL config (``GRPOConfig``,
``DistillationConfig``) into one trainer config.

The decoding config is listed *first* among the bases (``class C(BlockDecodingConfig, GRPOConfig)``), because a
dataclass orders its ``__init__`` parameters by where each field is first declared along the MRO, read from the
root: with the TRL config first, the decoding fields would come before ``output_dir`` and
``C("out")`` would set ``max_completion_length="out"``. The fields both classes declare (``temperature``,
``top_k``, ``max_completion_length``) are then re-declared in the trainer config with :func:`trl_field`, so TRL's
default, help text and meaning win, as they would with the TRL config first.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def trl_field(config_class: type, name: str, **changes: Any):
    """A fresh ``dataclasses.field`` with the default and metadata of ``config_class``'s field ``name``;
    ``changes`` (e.g. ``default=128``) replace parts of it."""
    f = config_class.__dataclass_fields__[name]
    kwargs: dict[str, Any] = {"metadata": dict(f.metadata)}
    if f.default is not MISSING:
        kwargs["default"] = f.default
    if f.default_factory is not MISSING:
        kwargs["default_factory"] = f.default_factory
    if "default" in changes:
        kwargs.pop("default_factory", None)
    if "help" in changes:
        kwargs["metadata"]["help"] = changes.pop("help")
    kwargs.update(changes)
    return field(**kwargs)


# TRL generation settings the block-diffusion rollouts cannot honour: the sampler takes its options from
# BlockDecodingConfig only (tau, tokens_per_step, temperature, top_k) and keeps its own exact block KV cache.
UNUSED_GENERATION_SETTINGS: dict[str, str] = {
    "generation_kwargs": "pass the sampler's options as config fields (tau, tokens_per_step, temperature, top_k) or "
                         "give the trainer a sampler=",
    "cache_implementation": "the sampler keeps its own block KV cache",
}


def refuse_unused_generation_settings(config: Any) -> None:
    """Raise :class:`~diffgr2_trl.errors.OptionError` naming the first TRL generation setting in
    :data:`UNUSED_GENERATION_SETTINGS` that ``config`` sets: it would otherwise be ignored without a word."""
    from ..errors import OptionError

    for name, instead in UNUSED_GENERATION_SETTINGS.items():
        value = getattr(config, name, None)
        if value:  # None and {} (TRL's "nothing to pass") are the defaults
            raise OptionError(name, f"is not used by the block-diffusion sampler ({instead}); got {value!r}.")
