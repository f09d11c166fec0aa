"""``bnfold doctor``: which onnxruntime is installed, which providers really execute, and the versions.

Exit codes: 0 healthy; 1 a problem was found (two onnxruntime distributions installed together, or a provider
listed as available whose probe session did not execute on it); 4 a provider named with ``--providers`` does
not really execute; 5 no onnxruntime is installed (the message says what to install).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from bnfold.errors import ExitCode
from bnfold.runtime import require_onnxruntime

if TYPE_CHECKING:
    from bnfold.validate.environment import RuntimeReport

NAME = "doctor"
HELP = "show the onnxruntime installation, probe each execution provider, and print versions"


def _provider_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--providers",
        type=_provider_list,
        metavar="LIST",
        help="probe these providers (cpu, cuda, ...) instead of every available one",
    )
    parser.add_argument("--json", metavar="PATH", help="write the findings as JSON to PATH ('-' for stdout)")


def render(console: Console, report: RuntimeReport) -> None:
    versions = Table(title="versions", title_justify="left", show_header=False)
    versions.add_column(style="bold")
    versions.add_column()
    for package, version in report.versions.items():
        versions.add_row(package, version or "[dim]not installed[/]")
    console.print(versions)

    distributions = ", ".join(f"{d.name} {d.version}" for d in report.distributions) or "none"
    console.print(f"onnxruntime distributions: {distributions}", highlight=False, soft_wrap=True)
    console.print(f"available providers: {', '.join(report.available_providers)}", highlight=False, soft_wrap=True)

    probes = Table(title="probe sessions (one Conv, optimisations off)", title_justify="left")
    for column in ("provider", "session providers", "Conv executed by", "result"):
        probes.add_column(column)
    for probe in report.probes:
        result = "[green]works[/]" if probe.works else f"[red]{probe.error}[/]"
        probes.add_row(probe.provider, ", ".join(probe.session_providers) or "-", probe.executed_by or "-", result)
    console.print(probes)
    for problem in report.problems:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if not report.problems:
        console.print("[green]no problems found[/]")


def run(args: argparse.Namespace) -> int:
    require_onnxruntime("bnfold doctor")  # (validate imports onnxruntime: check first, for a one-line error)
    from bnfold.cli.render import write_json
    from bnfold.validate.environment import inspect_runtime
    from bnfold.validate.sessions import resolve_provider

    providers = [resolve_provider(name) for name in args.providers] if args.providers else None
    report = inspect_runtime(providers)
    render(Console(file=sys.stderr if args.json == "-" else sys.stdout), report)
    if args.json:
        write_json(args.json, report.to_dict())
    if providers and not all(probe.works for probe in report.probes):
        return int(ExitCode.PROVIDER_UNAVAILABLE)
    return int(ExitCode.FAILED if report.problems else ExitCode.OK)
