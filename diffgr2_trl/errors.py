"""User-facing errors: the ``diffgr2`` console script prints these as one line (``--debug`` shows the traceback)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix (a path, a value, a changed input): the message says what to do."""


class OptionError(UserError):
    """A config dataclass's field out of range: ``option`` names the field, ``detail`` says what is wrong.

    The message reads ``"<option> <detail>"`` (``tau must be in (0, 1], got 2``); the command line prefixes the field
    with ``--``, as it is spelled there (``diffgr2_trl.commands._args``).
    """

    def __init__(self, option: str, detail: str):
        self.option, self.detail = option, detail
        super().__init__(f"{option} {detail}")


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
