"""argparse value types shared by the subcommands."""

from __future__ import annotations

import argparse


def comma_list(text: str) -> list[str]:
    """``"conv, gemm"`` → ``["conv", "gemm"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
