"""``diffgr2 bench-memory``: its case grammar and refusals (scripts/gpu_check.sh --cpu-dry-run runs two cases)."""

from __future__ import annotations

import pytest

from diffgr2_trl.commands.bench_memory import BenchMemoryArguments, parse_cases, run


def test_cases_parse_and_bad_ones_name_the_option():
    assert parse_cases("opd:32000:128, grpo:151936:512") == [("opd", 32000, 128), ("grpo", 151936, 512)]
    for bad in ("sft:32000:128", "opd:32k:128", "opd:32000", ""):
        with pytest.raises(ValueError, match="--cases"):
            parse_cases(bad)
    with pytest.raises(ValueError, match="--grpo_config must be a JSON object"):
        run(BenchMemoryArguments(cases="grpo:600:8", grpo_config="[1]"))

