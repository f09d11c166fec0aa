"""The output plan: every path a command will write, checked in one place before anything is written.

A command declares what it reads (the model, its external data, ``--data``, ``--load-inputs``) and what it will
write (the model output, ``--json``, ``--junit-xml``, ``--save-inputs``, the ``--keep-failed`` model), then calls
:meth:`OutputPlan.check` before its first write. A planned output is refused (:class:`~bnfold.errors.UsageError`,
exit 2, one line naming the flag and the path) when it

- is empty (``-o ''``) or names a directory (an existing one, or a path ending in ``/``);
- lies in a directory that does not exist;
- exists and is not a regular file (a device such as ``/dev/null``, a FIFO, a socket): bnfold writes by
  renaming a new file into place, which would replace the device node itself;
- is a file the command reads (any spelling, symlink or hard link), except the model output of an in-place
  run, which replaces its input on purpose (atomically; never the input's data files);
- is the same file as another planned output.

Files the command learns it reads only later (the external data files found when the model is loaded) are
checked with :meth:`OutputPlan.check_reads`, still before anything is written. ``-`` (stdout) is never a path.
No flag checks its own path: the commands build a plan instead.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from bnfold.errors import UsageError
from bnfold.files.load import data_files_of
from bnfold.files.paths import is_same_file

MODEL_OUTPUT = "-o"


@dataclasses.dataclass(frozen=True)
class PlannedOutput:
    """A path the command will write. ``flag`` names it in messages (``-o``, ``--json``, ...); ``replaces`` is
    the input file an in-place model output replaces on purpose."""

    text: str
    flag: str
    replaces: Path | None = None
    hint: str = ""  # ends the message when the output would overwrite the input, e.g. " (use --in-place ...)"

    @property
    def path(self) -> Path:
        return Path(self.text)

    @property
    def label(self) -> str:
        """How messages name it: the path for the model output, ``FLAG PATH`` for the others."""
        return self.text if self.flag == MODEL_OUTPUT else f"{self.flag} {self.text}"


@dataclasses.dataclass(frozen=True)
class PlannedRead:
    """A file the command reads; ``what`` names it in messages (``the input``, ``the --data file``, ...)."""

    path: Path
    what: str


_NOT_REGULAR = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class OutputPlan:
    """What one command run reads and writes; :meth:`check` refuses a plan that could destroy a file."""

    def __init__(self) -> None:
        self.reads: list[PlannedRead] = []
        self.outputs: list[PlannedOutput] = []

    def read(self, path: str | os.PathLike | None, what: str) -> OutputPlan:
        """Declare that the command reads ``path`` (``None``: nothing)."""
        if path is not None:
            self.reads.append(PlannedRead(Path(path), what))
        return self

    def read_model(self, path: str | os.PathLike | None) -> OutputPlan:
        """Declare that the command reads the model ``path`` and every external-data file it refers to."""
        if path is None:
            return self
        self.read(path, "the input")
        for file in sorted(data_files_of(path)):
            self.read(file, "a file the model is read from:")
        return self

    def write(
        self,
        path: str | os.PathLike | None,
        flag: str,
        *,
        replaces: str | os.PathLike | None = None,
        hint: str = "",
    ) -> OutputPlan:
        """Declare that the command writes ``path`` (``None`` and ``-``, stdout: nothing).

        Give ``path`` as the user typed it (a ``str``: ``Path`` drops a trailing ``/``). ``replaces``: the input
        this output replaces on purpose (``--in-place``); ``hint``: how to mean it when it would overwrite the input.
        """
        if path is None or (flag != MODEL_OUTPUT and os.fspath(path) == "-"):
            return self
        replaced = Path(replaces) if replaces is not None else None
        self.outputs.append(PlannedOutput(os.fspath(path), flag, replaced, hint))
        return self

    def check(self) -> None:
        """Refuse the plan (:class:`~bnfold.errors.UsageError`) if an output is unusable or would overwrite a
        file read or another output; see the module docstring."""
        for output in self.outputs:
            if output.replaces is None:  # (an in-place output is the input: the loader refuses what it cannot read)
                _check_usable(output)
        self.check_reads(())
        for index, output in enumerate(self.outputs):
            for other in self.outputs[:index]:
                if _same(output.path, other.path):
                    raise UsageError(f"{output.label}: {other.flag} writes the same file")

    def check_reads(self, files: Iterable[str | os.PathLike], what: str = "a file the model is read from:") -> None:
        """Refuse an output that is one of the declared reads, or of ``files`` (found later, named ``what``)."""
        reads = [*self.reads, *(PlannedRead(Path(file), what) for file in files)]
        for output in self.outputs:
            for read in reads:
                if output.replaces is not None and is_same_file(read.path, output.replaces):
                    continue  # the in-place model output replaces its input on purpose
                if _same(output.path, read.path):
                    shown = f"the input{output.hint}" if read.what == "the input" else f"{read.what} {read.path}"
                    raise UsageError(f"{output.label}: the output would overwrite {shown}")


def _same(first: Path, second: Path) -> bool:
    return os.path.abspath(first) == os.path.abspath(second) or is_same_file(first, second)


def _check_usable(output: PlannedOutput) -> None:
    text, label = output.text, output.label
    if not text:
        raise UsageError(f"{output.flag} '': an empty path; give a file path")
    if text.endswith(("/", os.sep)) or output.path.is_dir():
        raise UsageError(f"{label}: is a directory; give a file path")
    parent = output.path.parent
    if not parent.is_dir():
        what = "output directory" if output.flag == MODEL_OUTPUT else "directory"
        raise UsageError(f"{label}: {what} {parent} does not exist")
    try:
        mode = os.stat(output.path).st_mode
    except FileNotFoundError:
        return  # (a dangling symlink too: renaming into place replaces the link, not its target)
    except OSError as error:
        raise UsageError(f"{label}: cannot use this path ({error.strerror or error})") from error
    if not stat.S_ISREG(mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise UsageError(f"{label}: exists and is {kind}; bnfold writes only regular files")
