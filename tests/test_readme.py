"""The README's Python code: every ```python block compiles; a block marked runnable runs as written, and every
other block names, in a comment on the line before its fence, the example file it is a fragment of (which exists
and which ``tests/test_examples.py`` runs).

Markers: ``<!-- runnable ... -->`` (the block defines everything it uses) or ``<!-- fragment of examples/X.py ... -->``.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import REPO

FENCE = re.compile(r"^(?:(?P<marker><!-- runnable[^\n]*-->\n)|<!-- fragment of (?P<example>examples/\S+\.py)[^\n]*-->\n)?"
                   r"```python\n(?P<code>.*?)^```", re.M | re.S)


def python_blocks() -> list:
    """One ``pytest.param(line number, runnable, code)`` per ```python block in README.md."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text[: m.start("code")].count("\n") + 1
        blocks.append(pytest.param(line, bool(m.group("marker")), m.group("code"), m.group("example"), id=f"line{line}"))
    return blocks


def test_readme_has_a_runnable_core_example():
    runnable = [p.values[2] for p in python_blocks() if p.values[1]]
    assert any("RankingConstraint" in code for code in runnable)  # constrained decoding too
    assert any("BlockDiffusionSampler" in code and "replay_logprobs" in code for code in runnable)


@pytest.mark.parametrize("line,runnable,code,example", python_blocks())
def test_readme_python_block(line, runnable, code, example):
    compiled = compile(code, f"README.md:{line}", "exec")
    if not runnable:  # a fragment: it names the example it comes from, which exists
        assert example, f"README.md:{line}: mark the block runnable or name the example it is a fragment of"
        assert (REPO / example).is_file(), f"README.md:{line}: {example} does not exist"
        # a fragment calls what the example calls: every keyword argument it passes, the example passes too
        source = (REPO / example).read_text()
        passed = set(re.findall(r"[(,]\s*(\w+)=", re.sub(r"#[^\n]*", "", code)))
        missing = sorted(k for k in passed if not re.search(rf"\b{k}=", source))
        assert not missing, f"README.md:{line}: the fragment passes {missing}, which {example} does not"
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compiled, {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
