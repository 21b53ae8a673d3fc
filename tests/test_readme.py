"""The README's Python code: every ```python block compiles, and the blocks marked runnable run as written.

A block is marked runnable by an HTML comment starting ``<!-- runnable`` on the line before its fence; such blocks
must define everything they use (no ``model``/``tok`` left for the reader to supply).
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import REPO

FENCE = re.compile(r"^(?P<marker><!-- runnable[^\n]*-->\n)?```python\n(?P<code>.*?)^```", re.M | re.S)


def python_blocks() -> list:
    """One ``pytest.param(line number, runnable, code)`` per ```python block in README.md."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text[: m.start("code")].count("\n") + 1
        blocks.append(pytest.param(line, bool(m.group("marker")), m.group("code"), id=f"line{line}"))
    return blocks


def test_readme_has_a_runnable_core_example():
    runnable = [p.values[2] for p in python_blocks() if p.values[1]]
    assert any("BlockDiffusionSampler" in code and "replay_logprobs" in code for code in runnable)


@pytest.mark.parametrize("line,runnable,code", python_blocks())
def test_readme_python_block(line, runnable, code):
    compiled = compile(code, f"README.md:{line}", "exec")
    if not runnable:
        return  # fragments (trainer calls on the reader's own model and data): syntax only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compiled, {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
