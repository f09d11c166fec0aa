"""Output-path rules the writing subcommands share: never a file the input is read from, never a directory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bnfold.errors import UsageError
from bnfold.files.paths import is_same_file


def check_output_path(source: Path, output: Path, remedy: str) -> None:
    """:class:`UsageError` when ``output`` is the input file (any spelling, symlink, hard link) or a directory.

    ``remedy`` ends the message, e.g. ``" (use --in-place to mean it)"``.
    """
    if is_same_file(output, source):
        raise UsageError(f"{output}: the output would overwrite the input{remedy}")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path")


def check_json_path(target: str | None) -> None:
    """The ``--json`` file must be writable where asked, checked before any work (and before the model is saved)."""
    if target is None or target == "-":
        return
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"--json {path}: is a directory; give a file path")
    if not path.parent.is_dir():
        raise UsageError(f"--json {path}: directory {path.parent} does not exist")


def check_not_read(output: Path, read: Iterable[Path], what: str) -> None:
    """UsageError when ``output`` is one of the files ``read`` (any spelling, symlink or hard link)."""
    for file in read:
        if is_same_file(output, file):
            raise UsageError(f"{output}: the output would overwrite {what} {file}")
