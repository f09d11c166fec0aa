"""Path identity and the names bnfold gives the files it writes."""

from __future__ import annotations

import os
from pathlib import Path


def is_same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file: any spelling, symlink or hard link."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist
        return False


def external_data_name(path: str | os.PathLike) -> str:
    """The external data file name bnfold writes beside ``path``: ``<file name>.data``."""
    return Path(path).name + ".data"
