"""Fixtures of the security suite (helpers live in ``security_support.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from security_support import CliResult


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``bnfold.cli.main(argv)`` in this process; return exit code and captured output."""
    from bnfold.cli import main

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return CliResult(int(code), captured.out, captured.err)

    return run
