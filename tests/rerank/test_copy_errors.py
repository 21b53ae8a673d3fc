"""scripts/copy_errors.py: the level and slot of an invalid output's first miscopied ID, counted per file."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("copy_errors", Path(__file__).parents[2] / "scripts" / "copy_errors.py")
copy_errors_module = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(copy_errors_module)

CODES = {1: [1, 2, 3, 0], 2: [4, 5, 6, 0], 3: [7, 8, 9, 1]}


def encode(item: int) -> str:
    return "".join(f"<{level}_{code}>" for level, code in zip("abcd", CODES[item]))

ROWS = [{"user_id": 10, "candidates": [1, 2, 3]}, {"user_id": 11, "candidates": [3, 1, 2]}]


def _output(user: int, recs: list[str], error: str | None) -> dict:
    body = json.dumps({"explanation": "x", "recommendations": recs})
    return {"user_id": user, "completion": body + "<eos>", "valid": error is None, "error": error}


def test_counts_first_wrong_level_slot_and_last_level_rates():
    outputs = [
        # slot 1 miscopied in its third level only (<c_9> for <c_6>), slot 2 right
        _output(10, ["<a_1><b_2><c_3><d_0>", "<a_4><b_5><c_9><d_0>", "<a_7><b_8><c_9><d_1>"], "out_of_set_id"),
        # slot 0 (true last level 1) written with <d_0>: a last-level miscopy; later slots wrong too
        _output(11, ["<a_7><b_8><c_9><d_0>", "<a_1><b_2><c_3><d_0>", "<a_1><b_1><c_1><d_1>"], "out_of_set_id"),
    ]
    counts = copy_errors_module.copy_errors(ROWS, outputs, encode)
    assert counts["first_wrong_id_levels"] == {"c": 1, "d": 1}
    assert counts["first_wrong_id_slots"] == {0: 1, 1: 1}
    # 6 slots: true last level 0 in 4 (2 miscopied), 1 in 2 (1 miscopied)
    assert counts["miscopied_by_true_last_level"] == {"d_0": [2, 4], "d_>0": [1, 2]}


def test_valid_and_unparseable_outputs_count_no_first_wrong_id():
    outputs = [_output(10, ["<a_1><b_2><c_3><d_0>", "<a_4><b_5><c_6><d_0>", "<a_7><b_8><c_9><d_1>"], None),
               {"user_id": 11, "completion": "no json here", "error": "unparseable"}]
    counts = copy_errors_module.copy_errors(ROWS, outputs, encode)
    assert counts["first_wrong_id_levels"] == {}
    assert counts["miscopied_by_true_last_level"] == {"d_0": [0, 2], "d_>0": [0, 1]}


def test_outputs_from_another_split_are_refused():
    with pytest.raises(SystemExit, match="user 11 sits beside row of user 10"):
        copy_errors_module.copy_errors(ROWS, [_output(11, [], "out_of_set_id")], encode)
