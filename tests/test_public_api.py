"""The top-level API: ``from diffgr2_trl import X`` works for every public name, lazily."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys

import pytest

import diffgr2_trl


def test_every_public_name_resolves_to_its_definition():
    for name in diffgr2_trl.__all__:
        value = getattr(diffgr2_trl, name)
        if name == "__version__":
            continue
        home = importlib.import_module(f"diffgr2_trl.{diffgr2_trl._LAZY[name]}")
        assert value is getattr(home, name), name


def test_the_names_the_readme_tour_uses_are_public():
    from diffgr2_trl import (  # noqa: F401
        BlockDecodingConfig,
        BlockDiffusionConfig,
        BlockDiffusionSampler,
        BlockDiffusionTrainer,
        DiffusionGRPOConfig,
        DiffusionGRPOTrainer,
        OnPolicyDistillationConfig,
        OnPolicyDistillationTrainer,
        convert_to_block_diffusion,
    )


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        diffgr2_trl.NotAThing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from diffgr2_trl import NotAThing", {})


def test_import_is_lazy():
    code = ("import sys, json, diffgr2_trl; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_version_matches_the_installed_metadata():
    assert diffgr2_trl.__version__ == importlib.metadata.version("diffgr2-trl")
