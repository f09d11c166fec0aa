"""The ``bnfold`` command line: parse → call the API → render. No fold logic lives here.

Each subcommand is a module in this package exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. ``bnfold MODEL ...`` without a subcommand means ``bnfold fold MODEL ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence

from bnfold.errors import BnfoldError, ExitCode

# Subcommand name -> module (relative to this package). Imported lazily so `bnfold --help` stays fast.
COMMAND_MODULES: dict[str, str] = {
    "fold": "fold_command",
    "verify": "verify_command",
    "check": "check_command",
    "lower-training": "training_command",
    "doctor": "doctor_command",
    "recalibrate": "recalibrate_command",
}

EXIT_CODES_EPILOG = """exit codes:
  0  success (also when nothing was foldable); verification passed
  1  verification mismatch, or `check` found a foldable BatchNormalization
  2  usage error
  3  unreadable or invalid model
  4  a provider required with --require-provider is unavailable
  5  the command needs onnxruntime and none is installed
  6  an output could not be written (disk full, read-only, permission); nothing was replaced
  70 internal error (a bug in bnfold: please report it)"""

# The exit codes each subcommand can return (its --help lists only these, plus 70: an internal error).
_EXIT_CODE_TEXT = {
    0: "success",
    2: "usage error",
    3: "unreadable or invalid model",
    4: "a provider required with --require-provider is unavailable",
    5: "the command needs onnxruntime and none is installed",
    6: "an output could not be written (disk full, read-only, permission); nothing was replaced",
}
COMMAND_EXIT_CODES: dict[str, dict[int, str]] = {
    "fold": {0: "folded (also when nothing was foldable); verification passed", 1: "verification failed or timed out"
             " (--timeout): nothing was written", 2: "", 3: "", 4: "", 5: "", 6: ""},
    "verify": {0: "verification passed (or a provider was only skipped)", 1: "verification failed or timed out",
               2: "", 3: "", 4: "", 5: "", 6: ""},
    "check": {0: "nothing foldable", 1: "a foldable BatchNormalization (with --fail-on-any-bn: any BatchNormalization)",
              2: "", 3: "", 6: ""},
    "lower-training": {0: "", 2: "", 3: "", 6: ""},
    "doctor": {0: "the runtime works", 1: "a problem was found", 2: "", 4: "a provider named with --providers does"
               " not really execute", 5: ""},
    "recalibrate": {0: "", 1: "the fold after --fold failed verification: nothing was written", 2: "", 3: "",
                    5: "", 6: ""},
}  # fmt: skip


def exit_codes_epilog(command: str) -> str:
    """The ``exit codes:`` section of one subcommand's help (all codes for an unknown command)."""
    codes = COMMAND_EXIT_CODES.get(command)
    if codes is None:
        return EXIT_CODES_EPILOG
    lines = [f"  {code}  {text or _EXIT_CODE_TEXT[code]}" for code, text in sorted(codes.items())]
    lines.append(f"  {int(ExitCode.INTERNAL)} internal error (a bug in bnfold: please report it)")
    return "exit codes:\n" + "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors with exit code 2 and one line, as everything else does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"bnfold: error: {message}\n")


def _available_commands(names: Sequence[str] | None = None) -> dict[str, object]:
    """The importable subcommand modules among ``names`` (default: all of :data:`COMMAND_MODULES`)."""
    modules = {}
    for name in COMMAND_MODULES if names is None else names:
        module_name = COMMAND_MODULES[name]
        try:
            modules[name] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module_name}":
                raise
    return modules


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser with the subcommands ``commands`` (default: all; only those modules are imported)."""
    from bnfold import __version__

    parser = _Parser(
        prog="bnfold",
        description="Fold BatchNormalization into neighbouring layers of ONNX models and prove equivalence.",
        epilog="Run `bnfold MODEL` to fold a model (same as `bnfold fold MODEL`).\n\n" + EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in _available_commands(commands).items():
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=exit_codes_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    if argv and (argv[0] in COMMAND_MODULES or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["fold", *argv] if argv else argv


def _one_line(text: str, limit: int = 1000) -> str:
    """Collapse whitespace (newlines from onnx or protobuf included) so that an error stays one line."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _inputs_named(args: argparse.Namespace) -> str:
    """The input paths of this invocation, to name them when something unexpected goes wrong."""
    paths: list[str] = []
    for attribute in ("model", "original", "candidate", "models"):
        value = getattr(args, attribute, None)
        paths.extend(value if isinstance(value, list) else [value] if value else [])
    from bnfold.files.inputs import shown_path

    return ", ".join(shown_path(path) for path in paths)


def _out_of_memory(args: argparse.Namespace) -> str:
    """The words for running out of memory: naming the inputs (a bare "Cannot allocate memory" names nothing)."""
    inputs = _inputs_named(args)
    return f"{inputs}: out of memory" if inputs else "out of memory"


@contextlib.contextmanager
def _library_noise_hidden(debug: bool) -> Iterator[None]:
    """Without ``--debug``, hide library warnings and log records below ERROR: stderr carries our one line.

    With ``--debug`` everything passes through (Python warnings, ``onnx_ir`` log records, tracebacks).
    """
    if debug:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _stdout_gone() -> None:
    """The reader of stdout went away (``bnfold ... | head``): point stdout at /dev/null so exit stays quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler :func:`main` installs: unwinds like Ctrl-C, so staged files are removed."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


def _raise_terminated(signal_number: int, frame: object) -> None:
    raise Terminated(signal_number)


@contextlib.contextmanager
def _termination_unwinds() -> Iterator[None]:
    """While the CLI runs, SIGTERM raises :class:`Terminated` (in the main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(interrupt: KeyboardInterrupt) -> int:
    """One line and 128 + the signal number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    if isinstance(interrupt, Terminated):
        print("bnfold: terminated", file=sys.stderr)
        return 128 + interrupt.signal_number
    print("bnfold: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (see ``EXIT_CODES_EPILOG``); never raises, not even ``SystemExit``.

    Errors the library expects (:class:`~bnfold.errors.BnfoldError`) become one line on stderr and their exit
    code; an ``OSError`` (disk full, permission denied) one line and exit code 1; running out of memory one line
    naming the inputs; anything else one "internal error" line naming the inputs and exit code 70
    (``ExitCode.INTERNAL``, sysexits' EX_SOFTWARE: CI can tell a crash from a mismatch). ``--debug`` adds the
    traceback. Ctrl-C and SIGTERM — while the modules load, too — print one line and exit 130 / 143 after the
    staged files are removed (they unwind as :class:`KeyboardInterrupt`).
    """
    try:
        with _termination_unwinds():
            return _main(argv)
    except KeyboardInterrupt as interrupt:  # while importing or parsing (later ones are handled in _main)
        return _interrupted(interrupt)


def _main(argv: Sequence[str] | None) -> int:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    # Import only the subcommand that runs (each pulls in its own dependencies); all of them for the help.
    commands = [argv[0]] if argv and argv[0] in COMMAND_MODULES else [] if argv == ["--version"] else None
    parser = build_parser(commands)
    if not argv:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors: argparse already printed
        return ExitCode.USAGE if isinstance(stop.code, str) else int(stop.code or 0)
    debug = bool(getattr(args, "debug", False))
    with _library_noise_hidden(debug):
        try:
            return int(args.run(args))
        except BnfoldError as error:
            if debug:
                traceback.print_exc()
            print(_one_line(f"bnfold: error: {error}"), file=sys.stderr)
            return int(error.exit_code)
        except KeyboardInterrupt as interrupt:
            return _interrupted(interrupt)
        except BrokenPipeError:
            _stdout_gone()
            return ExitCode.FAILED
        except MemoryError:
            if debug:
                traceback.print_exc()
            print(_one_line(f"bnfold: error: {_out_of_memory(args)}"), file=sys.stderr)
            return ExitCode.FAILED
        except OSError as error:  # the environment failed us (disk full, permissions): not a bug, still one line
            if debug:
                traceback.print_exc()
            from bnfold.files.inputs import shown_path

            where = f"{shown_path(error.filename)}: " if error.filename else ""
            if not where and error.errno == errno.ENOMEM:  # (an mmap or a thread that could not be allocated)
                where = f"{_out_of_memory(args)}: "
            print(_one_line(f"bnfold: error: {where}{error.strerror or error}"), file=sys.stderr)
            return ExitCode.FAILED
        except Exception as error:
            if debug:
                traceback.print_exc()
            inputs = _inputs_named(args)
            context = f" on {inputs}" if inputs else ""
            message = f"bnfold: internal error{context}: {type(error).__name__}: {error}"
            print(_one_line(message) + " (rerun with --debug for the traceback)", file=sys.stderr)
            return ExitCode.INTERNAL
