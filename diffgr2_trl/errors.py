"""User-facing errors: the ``diffgr2`` console script prints these as one line (``--debug`` shows the traceback)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix (a path, a value, a changed input): the message says what to do."""


def check_model_dir(path: str, what: str = "--model_name_or_path") -> None:
    """Fail with a clear message unless ``path`` is a directory written by ``save_pretrained``.

    Without this, transformers reports a missing directory as an invalid hub repo id and an empty one as a
    tokenizer backend problem, neither of which says what is wrong.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {path}: no such directory.")
    if not p.is_dir():
        raise UserError(f"{what} {path}: not a directory (expected one written by save_pretrained).")
    if not (p / "config.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:10]
        raise UserError(f"{what} {path}: no model here (no config.json; found {found or 'nothing'}). Expected a "
                        "directory written by save_pretrained, e.g. RUN/<stage>/model of a pipeline run.")
