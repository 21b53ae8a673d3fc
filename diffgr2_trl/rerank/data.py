"""Sequential-recommendation data: loading, validation, leave-one-out split, statistics, raw Amazon preprocessing.

On-disk format (the one S3-Rec released for its Amazon datasets, which GR2 / Diffusion-GR2 use):

- ``NAME.txt``: one user per line, ``user_id item_id item_id ...``, items in time order. Ids are positive integers;
  item id 0 is reserved for padding.
- ``NAME_item2attributes.json``: ``{"item_id": [attribute_id, ...], ...}`` (brand and category-path ids).

Malformed input policy (each case is either a hard error naming ``file:line`` or a counted, documented skip):

===========================================  ======================================================
case                                         behaviour
===========================================  ======================================================
empty / whitespace-only line                 skipped, counted in ``LoadReport.empty_lines``
non-integer or non-positive id               ``DataFormatError`` with ``file:line``
user id seen twice                           ``DataFormatError`` with ``file:line`` of the repeat
user with fewer than 3 items                 skipped, counted in ``LoadReport.short_users`` (leave-one-out
                                             needs one training item + a validation and a test target)
item missing from the attributes file        empty attribute list, counted in
                                             ``LoadReport.items_without_attributes``
attributes file not valid JSON / bad ids     ``DataFormatError`` with ``file:line``
===========================================  ======================================================

Nothing here touches the network. :func:`preprocess_amazon_raw` converts the public raw Amazon 2014 files (downloaded
elsewhere) into this format.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "DataFormatError",
    "LoadReport",
    "SequenceData",
    "Split",
    "dataset_stats",
    "infer_dataset_name",
    "leave_one_out",
    "load_item_attributes",
    "load_sequence_data",
    "load_sequences",
    "locate_data_dir",
    "preprocess_amazon_raw",
    "save_stats",
]

DATA_DIR_ENV = "DIFFGR2_DATA_DIR"
MIN_ITEMS_PER_USER = 3  # one training item + validation target + test target


class DataFormatError(ValueError):
    """Malformed data file; the message starts with ``path:line``."""


# --------------------------------------------------------------------------------------------------- locating


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def infer_dataset_name(data_dir: str | os.PathLike) -> str:
    """The dataset stem ``NAME`` of a directory holding exactly one ``NAME.txt`` with its ``NAME_item2attributes.json``.

    Raises:
        FileNotFoundError: naming what the directory holds when there is no such pair, or more than one.
    """
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"Data dir {d} does not exist.")
    names = sorted(p.stem for p in d.glob("*.txt") if (d / f"{p.stem}_item2attributes.json").is_file())
    if len(names) == 1:
        return names[0]
    found = sorted(p.name for p in d.iterdir())[:20]
    if not names:
        raise FileNotFoundError(
            f"No dataset in {d}: expected one NAME.txt with its NAME_item2attributes.json; found {found}. "
            "For a NAME.txt without attributes pass `diffgr2 prepare --name NAME` (in the pipeline: "
            "`prepare: {name: NAME}` in the --overrides file)."
        )
    raise FileNotFoundError(f"Several datasets in {d}: {names}; choose one with `diffgr2 prepare --name NAME` (in the "
                            "pipeline: `prepare: {name: NAME}` in the --overrides file).")


def locate_data_dir(path: str | os.PathLike | None = None, name: str | None = "Beauty") -> Path:
    """Find the directory holding ``{name}.txt`` (and normally ``{name}_item2attributes.json``).

    Tried in order: the explicit ``path``; the ``DIFFGR2_DATA_DIR`` environment variable; ``../shared/data/amazon-beauty``
    relative to the current directory; the same relative to the repository root. An explicit ``path`` or environment
    variable that lacks the file is an error (no silent fallback past what the user asked for).

    Raises:
        FileNotFoundError: listing every location tried.
    """
    tried: list[str] = []

    def ok(d: Path) -> bool:
        tried.append(str(d))
        if name is None:
            try:
                infer_dataset_name(d)
                return True
            except FileNotFoundError:
                return False
        return (d / f"{name}.txt").is_file()

    if path is not None and name is None:
        d = Path(path).expanduser()
        infer_dataset_name(d)  # raises with what the directory holds
        return d.resolve()

    if path is not None:
        d = Path(path).expanduser()
        if ok(d):
            return d.resolve()
        raise FileNotFoundError(f"{name}.txt not found in the given data dir {d}")
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        d = Path(env).expanduser()
        if ok(d):
            return d.resolve()
        raise FileNotFoundError(f"{name}.txt not found in ${DATA_DIR_ENV}={env}")
    for base in (Path.cwd(), _repo_root()):
        d = base.parent / "shared" / "data" / "amazon-beauty"
        if ok(d):
            return d.resolve()
    raise FileNotFoundError(
        f"Could not find {name}.txt. Tried: {', '.join(tried)}. Pass a data dir explicitly or set ${DATA_DIR_ENV}; "
        "raw Amazon files can be converted with diffgr2_trl.rerank.data.preprocess_amazon_raw."
    )


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What the loader skipped or filled in (see the module docstring for the policy)."""

    empty_lines: int = 0
    short_users: int = 0
    items_without_attributes: int = 0
    unterminated_last_line: bool = False  # a file cut mid-write usually ends without its newline


@dataclass
class SequenceData:
    """Users' item sequences (oldest first) and item attributes.

    Attributes:
        sequences: ``user_id -> [item_id, ...]`` in time order, users in file order.
        item_attributes: ``item_id -> [attribute_id, ...]`` for every item that occurs in ``sequences``.
        n_items: largest item id (item ids are ``1..n_items``; 0 is padding).
        report: counts of skipped / filled-in records.
    """

    sequences: dict[int, list[int]]
    item_attributes: dict[int, list[int]]
    n_items: int
    report: LoadReport = field(default_factory=LoadReport)


def _parse_id(tok: str, where: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise DataFormatError(f"{where}: non-integer id {tok!r}") from None
    if v <= 0:
        raise DataFormatError(f"{where}: ids must be positive integers (0 is padding), got {v}")
    return v


def load_sequences(
    path: str | os.PathLike, min_items: int = MIN_ITEMS_PER_USER, report: LoadReport | None = None,
    allow_truncated: bool = False,
) -> dict[int, list[int]]:
    """Read ``user item item ...`` lines. Users with fewer than ``min_items`` items are skipped and counted.

    A last line without its newline means the file was most likely cut mid-write (an interrupted download or copy):
    that raises :class:`DataFormatError`, since a run built on part of the users looks complete and is not.
    ``allow_truncated=True`` accepts such a file with a warning and drops its last (possibly partial) line.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    seqs: dict[int, list[int]] = {}
    first_line: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        line = ""
        for lineno, line in enumerate(f, start=1):
            toks = line.split()
            if not toks:
                report.empty_lines += 1
                continue
            where = f"{path}:{lineno}"
            ids = [_parse_id(t, where) for t in toks]
            user, items = ids[0], ids[1:]
            if user in first_line:
                raise DataFormatError(f"{where}: user {user} already appeared on line {first_line[user]}")
            first_line[user] = lineno
            if len(items) < min_items:
                report.short_users += 1
                continue
            seqs[user] = items
    if line and not line.endswith("\n"):
        report.unterminated_last_line = True
        last_user = int(line.split()[0]) if line.split() else None
        complete = len(seqs) - (last_user in seqs)
        if not allow_truncated:
            raise DataFormatError(
                f"{path}:{lineno}: the last line has no newline at its end: the file looks cut short ({complete} "
                "users on complete lines). Fetch it again, or pass --allow_truncated to use it without its last line."
            )
        seqs.pop(last_user, None)
        logger.warning("%s:%d: the last line has no newline at its end (the file may have been cut short); "
                       "--allow_truncated: dropped that line, %d users read.", path, lineno, len(seqs))
    if report.empty_lines or report.short_users:
        logger.warning(
            "%s: skipped %d empty lines and %d users with < %d items",
            path,
            report.empty_lines,
            report.short_users,
            min_items,
        )
    if not seqs:
        raise DataFormatError(f"{path}: no user with at least {min_items} items")
    return seqs


def load_item_attributes(path: str | os.PathLike) -> dict[int, list[int]]:
    """Read ``{"item": [attr, ...]}``. Errors name ``file:line`` (JSON position or the line of the bad key)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}:1: expected a JSON object mapping item id -> list of attribute ids")

    def where(key: str) -> str:
        # JSON has no per-key line numbers; find the key's first occurrence so the message points somewhere useful.
        pos = text.find(json.dumps(key))
        return f"{path}:{text.count(chr(10), 0, pos) + 1 if pos >= 0 else 1}"

    out: dict[int, list[int]] = {}
    for key, attrs in raw.items():
        item = _parse_id(key, where(key))
        if not isinstance(attrs, list):
            raise DataFormatError(f"{where(key)}: attributes of item {key} must be a list, got {type(attrs).__name__}")
        out[item] = [_parse_id(str(a), where(key)) for a in attrs]
    return out


def load_sequence_data(data_dir: str | os.PathLike | None = None, name: str | None = "Beauty",
                       allow_truncated: bool = False) -> SequenceData:
    """Locate (see :func:`locate_data_dir`) and load ``{name}.txt`` plus ``{name}_item2attributes.json``.

    ``name=None`` infers the stem from the directory (:func:`infer_dataset_name`). A missing attributes file is
    allowed when ``name`` is given (every item gets no attributes, counted in the report). ``allow_truncated``: see
    :func:`load_sequences`.
    """
    d = locate_data_dir(data_dir, name)
    if name is None:
        name = infer_dataset_name(d)
    report = LoadReport()
    seqs = load_sequences(d / f"{name}.txt", report=report, allow_truncated=allow_truncated)
    attr_path = d / f"{name}_item2attributes.json"
    attrs = load_item_attributes(attr_path) if attr_path.is_file() else {}
    items = sorted({i for s in seqs.values() for i in s})
    item_attributes: dict[int, list[int]] = {}
    for i in items:
        if i not in attrs:
            report.items_without_attributes += 1
        item_attributes[i] = attrs.get(i, [])
    if report.items_without_attributes:
        logger.warning("%s: %d items have no attributes", attr_path, report.items_without_attributes)
    return SequenceData(seqs, item_attributes, n_items=items[-1], report=report)


# ------------------------------------------------------------------------------------------ split and stats


@dataclass
class Split:
    """Leave-one-out split by time.

    For a user sequence ``s`` (length ``n >= 3``):

    - ``train[u] = s[:-2]`` (a sequential model trains on every prefix of it),
    - ``valid[u] = (s[:-2], s[-2])``: history and target,
    - ``test[u] = (s[:-1], s[-1])``: full history minus the target.
    """

    train: dict[int, list[int]]
    valid: dict[int, tuple[list[int], int]]
    test: dict[int, tuple[list[int], int]]


def leave_one_out(sequences: dict[int, list[int]]) -> Split:
    """Split every user's sequence by time (see :class:`Split`)."""
    train, valid, test = {}, {}, {}
    for u, s in sequences.items():
        if len(s) < MIN_ITEMS_PER_USER:
            raise ValueError(f"user {u} has {len(s)} items; leave-one-out needs at least {MIN_ITEMS_PER_USER}")
        train[u] = s[:-2]
        valid[u] = (s[:-2], s[-2])
        test[u] = (s[:-1], s[-1])
    return Split(train, valid, test)


def dataset_stats(sequences: dict[int, list[int]], item_attributes: dict[int, list[int]] | None = None) -> dict:
    """Users, items, interactions, mean sequence length (and attribute count when given)."""
    n_inter = sum(len(s) for s in sequences.values())
    stats = {
        "users": len(sequences),
        "items": len({i for s in sequences.values() for i in s}),
        "interactions": n_inter,
        "mean_length": round(n_inter / max(len(sequences), 1), 2),
    }
    if item_attributes is not None:
        stats["attributes"] = len({a for v in item_attributes.values() for a in v})
    return stats


def save_stats(stats: dict, path: str | os.PathLike) -> None:
    """Write ``stats`` as pretty JSON (and print it, so ``prepare`` logs what it saw)."""
    Path(path).write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


# ------------------------------------------------------------------------------------- raw Amazon preprocessing


def _read_records(path: Path):
    """Yield dicts from a (gzipped) JSON-lines file; lines that are python literals (old Amazon meta) also work."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                try:
                    yield ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise DataFormatError(f"{path}:{lineno}: neither JSON nor a python literal") from None


def preprocess_amazon_raw(
    reviews_path: str | os.PathLike,
    meta_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    name: str = "Beauty",
    core: int = 5,
) -> tuple[Path, Path]:
    """Convert raw Amazon 2014 review/meta files into ``{name}.txt`` + ``{name}_item2attributes.json``.

    Follows the S3-Rec recipe: keep (user, item, time) from ``reviews`` (``reviewerID``, ``asin``,
    ``unixReviewTime``), iteratively filter to the ``core``-core (every user and item has >= ``core`` interactions),
    sort each user's items by time (stable, so same-second reviews keep file order), remap users and items to ids
    from 1 in order of first appearance. Attributes = the item's ``brand`` plus every category on its category paths
    (``categories`` in the meta file), remapped to ids from 1 in order of first appearance.

    Returns:
        The paths of the two files written.
    """
    reviews_path, out_dir = Path(reviews_path), Path(out_dir)
    inter: list[tuple[str, str, int, int]] = []  # user, asin, time, file order
    for n, r in enumerate(_read_records(reviews_path)):
        inter.append((r["reviewerID"], r["asin"], int(r["unixReviewTime"]), n))

    while True:  # k-core: removing users can push items below the threshold and vice versa
        uc = Counter(u for u, _, _, _ in inter)
        ic = Counter(i for _, i, _, _ in inter)
        kept = [x for x in inter if uc[x[0]] >= core and ic[x[1]] >= core]
        if len(kept) == len(inter):
            break
        inter = kept
    if not inter:
        raise DataFormatError(f"{reviews_path}: nothing left after {core}-core filtering")

    by_user: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for u, i, t, n in inter:
        by_user[u].append((t, n, i))
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    lines = []
    for u, rows in by_user.items():
        uid = user_ids.setdefault(u, len(user_ids) + 1)
        seq = [item_ids.setdefault(i, len(item_ids) + 1) for _, _, i in sorted(rows)]
        lines.append(f"{uid} " + " ".join(map(str, seq)))

    attr_ids: dict[str, int] = {}
    item_attrs: dict[int, list[int]] = {i: [] for i in item_ids.values()}
    if meta_path is not None:
        for m in _read_records(Path(meta_path)):
            iid = item_ids.get(m.get("asin"))
            if iid is None:
                continue
            names = [f"brand:{m['brand']}"] if m.get("brand") else []
            for path_ in m.get("categories", []) or []:
                names += [f"cat:{c}" for c in path_]
            attrs = []
            for nm in names:
                a = attr_ids.setdefault(nm, len(attr_ids) + 1)
                if a not in attrs:
                    attrs.append(a)
            item_attrs[iid] = attrs

    out_dir.mkdir(parents=True, exist_ok=True)
    seq_path, attr_path = out_dir / f"{name}.txt", out_dir / f"{name}_item2attributes.json"
    seq_path.write_text("\n".join(lines) + "\n")
    attr_path.write_text(json.dumps({str(k): v for k, v in sorted(item_attrs.items())}))
    # The attribute names are kept for humans (prompts could use them when titles are unavailable).
    (out_dir / f"{name}_attribute_names.json").write_text(json.dumps({v: k for k, v in attr_ids.items()}))
    return seq_path, attr_path


def stats_to_json(stats: dict, report: LoadReport) -> dict:
    """Stats plus the loader's skip counts, for ``stats.json``."""
    return {**stats, "load_report": asdict(report)}
