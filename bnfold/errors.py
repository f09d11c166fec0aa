"""Errors and exit codes shared by the API and the CLI.

The library raises these; only the CLI turns them into a one-line message and an exit code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``bnfold`` CLI (documented in README and ``--help``)."""

    OK = 0
    FAILED = 1  # verification mismatch, or `check` found a foldable BatchNormalization
    USAGE = 2
    INVALID_MODEL = 3
    PROVIDER_UNAVAILABLE = 4
    RUNTIME_MISSING = 5  # the command needs onnxruntime and no onnxruntime distribution is installed
    WRITE_FAILED = 6  # an output could not be written (disk full, read-only, permission); nothing was replaced
    INTERNAL = 70  # a bug in bnfold (sysexits' EX_SOFTWARE): never a verdict on the model


class BnfoldError(Exception):
    """Base class: an expected failure with a one-line, user-facing message."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(BnfoldError):
    """The command line or the API call asks for something contradictory or impossible."""

    exit_code = ExitCode.USAGE


class InvalidModelError(BnfoldError):
    """A model file cannot be read, parsed or trusted (includes unsafe external-data references)."""

    exit_code = ExitCode.INVALID_MODEL


class ProviderUnavailableError(BnfoldError):
    """A requested onnxruntime execution provider is not really available (``--require-provider``)."""

    exit_code = ExitCode.PROVIDER_UNAVAILABLE


class RuntimeMissingError(BnfoldError):
    """The command needs onnxruntime (to verify, recalibrate or probe) and none is installed."""

    exit_code = ExitCode.RUNTIME_MISSING


class WriteFailedError(BnfoldError):
    """An output file could not be written (the message names the path the user gave, not a staging file)."""

    exit_code = ExitCode.WRITE_FAILED


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message with whitespace collapsed to one line (at most ``limit`` characters)."""
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__
