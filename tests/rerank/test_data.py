"""Loader, malformed-input policy, leave-one-out split, stats, raw Amazon preprocessing."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from diffgr2_trl.rerank.data import (
    DataFormatError,
    LoadReport,
    dataset_stats,
    leave_one_out,
    load_item_attributes,
    load_sequence_data,
    load_sequences,
    locate_data_dir,
    preprocess_amazon_raw,
)

BEAUTY = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-beauty"


def _write(d: Path, lines: list[str], attrs: dict | None = None, name: str = "Toy") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.txt").write_text("\n".join(lines) + "\n")
    if attrs is not None:
        (d / f"{name}_item2attributes.json").write_text(json.dumps(attrs))
    return d


def test_locate_explicit_env_and_error(tmp_path, monkeypatch):
    d = _write(tmp_path / "a", ["1 1 2 3"], name="Toy")
    assert locate_data_dir(d, name="Toy") == d.resolve()
    with pytest.raises(FileNotFoundError, match="given data dir"):
        locate_data_dir(tmp_path / "missing", name="Toy")
    monkeypatch.setenv("DIFFGR2_DATA_DIR", str(d))
    assert locate_data_dir(None, name="Toy") == d.resolve()
    monkeypatch.delenv("DIFFGR2_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        locate_data_dir(None, name="NoSuchDataset")
    msg = str(e.value)
    assert "Tried:" in msg and "amazon-beauty" in msg and str(tmp_path.parent) in msg


def test_non_integer_id_names_file_and_line(tmp_path):
    d = _write(tmp_path, ["1 1 2 3", "", "2 4 x5 6"])
    with pytest.raises(DataFormatError, match=r"Toy\.txt:3: non-integer id 'x5'"):
        load_sequences(d / "Toy.txt")


def test_zero_id_and_duplicate_user_are_errors(tmp_path):
    d = _write(tmp_path / "z", ["1 1 0 3"])
    with pytest.raises(DataFormatError, match=r"Toy\.txt:1: ids must be positive"):
        load_sequences(d / "Toy.txt")
    d = _write(tmp_path / "dup", ["1 1 2 3", "2 1 2 3", "1 4 5 6"])
    with pytest.raises(DataFormatError, match=r"Toy\.txt:3: user 1 already appeared on line 1"):
        load_sequences(d / "Toy.txt")


def test_empty_lines_and_short_users_are_counted_skips(tmp_path):
    d = _write(tmp_path, ["1 1 2 3", "", "   ", "2 4 5", "3 7", "4 1 2 3 4"])
    report = LoadReport()
    seqs = load_sequences(d / "Toy.txt", report=report)
    assert seqs == {1: [1, 2, 3], 4: [1, 2, 3, 4]}
    assert (report.empty_lines, report.short_users) == (2, 2)


def test_attributes_errors_and_missing_items(tmp_path):
    d = _write(tmp_path, ["1 1 2 3", "2 3 4 5"], attrs={"1": [1, 2], "2": [2], "3": [], "4": [3]})
    data = load_sequence_data(d, name="Toy")
    assert data.item_attributes[5] == [] and data.report.items_without_attributes == 1
    assert data.n_items == 5
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": [1],\n "2": [2,\n')
    with pytest.raises(DataFormatError, match=r"bad\.json:\d+:\d+: invalid JSON .* column \d+"):
        load_item_attributes(bad)
    bad.write_text('{"1": [1],\n"x": [2]}')
    with pytest.raises(DataFormatError, match=r"bad\.json:2: non-integer id 'x'"):
        load_item_attributes(bad)


def test_leave_one_out_by_time():
    split = leave_one_out({7: [10, 11, 12, 13, 14], 8: [1, 2, 3]})
    assert split.train == {7: [10, 11, 12], 8: [1]}
    assert split.valid == {7: ([10, 11, 12], 13), 8: ([1], 2)}
    assert split.test == {7: ([10, 11, 12, 13], 14), 8: ([1, 2], 3)}
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out({1: [1, 2]})


def test_stats():
    stats = dataset_stats({1: [1, 2, 3], 2: [2, 3, 4, 5]}, {1: [1], 2: [1, 2]})
    assert stats == {"users": 2, "items": 5, "interactions": 7, "mean_length": 3.5, "attributes": 2}


def _gz_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_preprocess_amazon_raw(tmp_path):
    # 6 users x items A..E (each user reviews all 5, time reversed for u1); user u6 reviews only 2 -> dropped by the
    # 5-core filter, and item Z (reviewed by u6 only) goes with it.
    reviews = []
    for u in range(1, 6):
        times = [100 - t for t in range(5)] if u == 1 else list(range(5))
        for asin, t in zip("ABCDE", times):
            reviews.append(json.dumps({"reviewerID": f"u{u}", "asin": asin, "unixReviewTime": t}))
    reviews += [json.dumps({"reviewerID": "u6", "asin": a, "unixReviewTime": 1}) for a in "AZ"]
    _gz_lines(tmp_path / "reviews_Toy_5.json.gz", reviews)
    meta = [
        "{'asin': 'A', 'brand': 'Acme', 'categories': [['Beauty', 'Skin'], ['Beauty', 'Hair']]}",  # python literal
        json.dumps({"asin": "B", "categories": [["Beauty", "Skin"]]}),
        "{'asin': 'Q', 'brand': 'Other'}",  # not in the reviews: ignored
    ]
    _gz_lines(tmp_path / "meta_Toy.json.gz", meta)
    seq_path, attr_path = preprocess_amazon_raw(
        tmp_path / "reviews_Toy_5.json.gz", tmp_path / "meta_Toy.json.gz", tmp_path / "out", name="Toy"
    )
    lines = seq_path.read_text().split("\n")[:-1]
    assert lines[0] == "1 1 2 3 4 5"  # u1's items in time order E, D, C, B, A -> ids 1..5 by first appearance
    assert lines[1:] == [f"{u} 5 4 3 2 1" for u in range(2, 6)]
    attrs = json.loads(attr_path.read_text())
    assert attrs["5"] == [1, 2, 3, 4]  # A: brand:Acme, cat:Beauty, cat:Skin, cat:Hair (dedup'd)
    assert attrs["4"] == [2, 3] and attrs["1"] == []
    data = load_sequence_data(tmp_path / "out", name="Toy")
    assert dataset_stats(data.sequences)["interactions"] == 25


@pytest.mark.slow  # reads the real Beauty data
@pytest.mark.skipif(not (BEAUTY / "Beauty.txt").is_file(), reason="Amazon Beauty data not present")
def test_beauty_statistics():
    t0 = time.perf_counter()
    data = load_sequence_data(BEAUTY)
    stats = dataset_stats(data.sequences, data.item_attributes)
    assert (stats["users"], stats["items"], stats["interactions"], stats["mean_length"]) == (
        22363,
        12101,
        198502,
        8.88,
    )
    assert stats["attributes"] == 637
    assert data.report == LoadReport()
    split = leave_one_out(data.sequences)
    assert sum(len(s) for s in split.train.values()) == 198502 - 2 * 22363
    assert time.perf_counter() - t0 < 60


def test_a_file_cut_mid_line_is_refused_unless_allowed(tmp_path, caplog):
    path = tmp_path / "Toy.txt"
    path.write_text("1 1 2 3\n2 4 5 6\n3 7 8 9")  # cut before the last newline (and maybe mid-line)
    with pytest.raises(DataFormatError, match=r"Toy.txt:3: the last line has no newline.*\(2 users on complete.*--allow_truncated"):
        load_sequences(path, report=LoadReport())
    report = LoadReport()
    with caplog.at_level("WARNING"):
        seqs = load_sequences(path, report=report, allow_truncated=True)
    assert report.unterminated_last_line and seqs == {1: [1, 2, 3], 2: [4, 5, 6]}  # the cut line is dropped
    assert "Toy.txt:3: the last line has no newline" in caplog.text
    path.write_text("1 1 2 3\n")
    assert not load_sequences(path, report=(r := LoadReport())) or not r.unterminated_last_line
