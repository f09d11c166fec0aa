"""The output-path rule every writing subcommand shares: never the input file, never a directory."""

from __future__ import annotations

import os
from pathlib import Path

from bnfold.errors import UsageError


def check_output_path(source: Path, output: Path, remedy: str) -> None:
    """:class:`UsageError` when ``output`` is the input file (any spelling, symlink, hard link) or a directory.

    ``remedy`` ends the message, e.g. ``" (use --in-place to mean it)"``.
    """
    same = output.resolve() == source.resolve() or (
        output.exists() and source.exists() and os.path.samefile(output, source)
    )
    if same:
        raise UsageError(f"{output}: the output would overwrite the input{remedy}")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path")
