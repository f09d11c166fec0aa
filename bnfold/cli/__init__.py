"""The ``bnfold`` command line: parse → call the API → render. No fold logic lives here.

Each subcommand is a module in this package exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. ``bnfold MODEL ...`` without a subcommand means ``bnfold fold MODEL ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from bnfold.errors import BnfoldError, ExitCode

# Subcommand name -> module (relative to this package). Imported lazily so `bnfold --help` stays fast.
COMMAND_MODULES: dict[str, str] = {
    "fold": "fold_command",
    "verify": "verify_command",
    "check": "check_command",
    "lower-training": "training_command",
    "doctor": "doctor_command",
}

EXIT_CODES_EPILOG = """exit codes:
  0  success (also when nothing was foldable); verification passed
  1  verification mismatch, or `check` found a foldable BatchNormalization
  2  usage error
  3  unreadable or invalid model
  4  a provider required with --require-provider is unavailable"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors with exit code 2 and one line, as everything else does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"bnfold: error: {message}\n")


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMAND_MODULES.items():
        try:
            modules[name] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    from bnfold import __version__

    parser = _Parser(
        prog="bnfold",
        description="Fold BatchNormalization into neighbouring layers of ONNX models and prove equivalence.",
        epilog="Run `bnfold MODEL` to fold a model (same as `bnfold fold MODEL`).\n\n" + EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in _available_commands().items():
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=EXIT_CODES_EPILOG,
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors: argparse already printed
        return int(stop.code or 0)
    try:
        return int(args.run(args))
    except BnfoldError as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"bnfold: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(
            f"bnfold: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return ExitCode.FAILED
