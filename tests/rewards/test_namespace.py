"""The rewards' import path is namespaced (``diffgr2_trl.rewards``): a project's own ``rewards.py`` cannot shadow it,
and the distribution installs no top-level ``rewards`` package that would shadow the project's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib

from setuptools import find_packages

from tests.helpers import REPO, launch_env


def test_installed_packages_hold_no_top_level_rewards():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "diffgr2_trl.rewards" in packages
    assert not [p for p in packages if p.split(".")[0] != "diffgr2_trl"], packages


def test_a_users_own_rewards_module_beside_the_script(tmp_path):
    """A common GRPO layout: ``rewards.py`` next to the training script. Both it and the re-ranking rewards import,
    directly and the way ``trl grpo --reward_funcs`` resolves dotted paths (current directory first on sys.path)."""
    (tmp_path / "rewards.py").write_text("def length_reward(completions, **kwargs):\n"
                                         "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import importlib, os, sys
        from rewards import length_reward
        from diffgr2_trl.rewards.rerank import gr2_reward

        sys.path.insert(0, os.getcwd())  # what trl grpo does before importing --reward_funcs paths
        trl_style = importlib.import_module("diffgr2_trl.rewards.rerank").validity
        cands = ["<a_1><b_1>", "<a_2><b_2>"]
        text = '{"explanation": "x", "recommendations": ["<a_2><b_2>", "<a_1><b_1>"]}'
        print(length_reward(["ab"]), gr2_reward(None, [text], candidates=[cands], target=[cands[1]]),
              trl_style(None, [text], candidates=[cands], target=[cands[1]]))
    """))
    proc = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=launch_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[2.0]", "[0.7]", "[1.0]"]
