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


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message with whitespace collapsed to one line (at most ``limit`` characters)."""
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__
