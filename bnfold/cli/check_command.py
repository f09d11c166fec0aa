"""``bnfold check MODEL...``: list the BatchNormalization nodes that could still be folded (a CI gate).

Nothing is written: each model is folded in memory and only the report is kept. Exit codes: 0 nothing
foldable, 1 some model has a foldable BatchNormalization, 3 some model could not be read (the other
models are still checked and reported).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from bnfold import api
from bnfold.cli.arg_types import comma_list
from bnfold.cli.render import write_json
from bnfold.errors import ExitCode, InvalidModelError
from bnfold.report import FoldReport
from bnfold.validate.github_summary import append_step_summary
from bnfold.validate.junit import JUnitCase, JUnitSuite, write_junit_xml

NAME = "check"
HELP = "list BatchNormalization nodes that could still be folded; exit 1 if any (for pre-commit and CI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models to check")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH ('-' for stdout)")
    parser.add_argument("--junit-xml", metavar="PATH", help="write JUnit XML (one testcase per model)")
    parser.add_argument("--only", type=comma_list, metavar="RULES", help="comma-separated rules to consider")
    parser.add_argument("--skip", type=comma_list, metavar="RULES", help="comma-separated rules to ignore")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")


@dataclass(frozen=True)
class ModelCheck:
    """The outcome for one model: its fold report, or the reason it could not be read."""

    model: str
    report: FoldReport | None
    error: str | None

    @property
    def foldable(self) -> tuple:
        return self.report.folded if self.report is not None else ()

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "error": self.error,
            "foldable": [record.to_dict() for record in self.foldable],
            "kept": [record.to_dict() for record in self.report.skipped] if self.report is not None else [],
        }


def check_models(paths: list[str], only: list[str] | None, skip: list[str] | None) -> list[ModelCheck]:
    checks = []
    for path in paths:
        try:
            checks.append(ModelCheck(path, api.check(path, only=only, skip=skip), None))
        except InvalidModelError as error:
            checks.append(ModelCheck(path, None, str(error)))
    return checks


def exit_code(checks: list[ModelCheck]) -> int:
    if any(check.error is not None for check in checks):
        return int(ExitCode.INVALID_MODEL)
    if any(check.foldable for check in checks):
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def render(console: Console, errors: Console, checks: list[ModelCheck]) -> None:
    """Foldable BatchNormalization per model on ``console``; unreadable models on ``errors``."""
    for check in checks:
        if check.error is not None:
            errors.print(f"bnfold: error: {check.error}", highlight=False, markup=False, soft_wrap=True)
            continue
        kept = len(check.report.skipped)
        kept_text = f"; {kept} BatchNormalization kept, each with a reason" if kept else ""
        if not check.foldable:
            console.print(f"[green]{check.model}[/]: nothing to fold{kept_text}", highlight=False, soft_wrap=True)
            continue
        console.print(
            f"[bold red]{check.model}[/]: {len(check.foldable)} foldable BatchNormalization{kept_text}",
            highlight=False,
            soft_wrap=True,
        )
        table = Table()
        for column in ("node", "graph", "into", "rule"):
            table.add_column(column)
        for record in check.foldable:
            into = f"{record.producer} {record.producer_node!r}" if record.producer else "-"
            table.add_row(record.node, record.graph, into, record.rule or "-")
        console.print(table)


def junit_cases(checks: list[ModelCheck]) -> tuple[JUnitCase, ...]:
    cases = []
    for check in checks:
        failure = None
        if check.error is not None:
            failure = f"cannot check: {check.error}"
        elif check.foldable:
            names = ", ".join(f"{record.node} (into {record.producer})" for record in check.foldable)
            failure = f"{len(check.foldable)} foldable BatchNormalization: {names}"
        cases.append(JUnitCase("bnfold.check", check.model, failure=failure))
    return tuple(cases)


def markdown(checks: list[ModelCheck]) -> str:
    lines = ["### bnfold check", "", "| model | foldable BatchNormalization | result |", "|---|---|---|"]
    for check in checks:
        if check.error is not None:
            lines.append(f"| `{check.model}` | – | ❌ {check.error} |")
        elif check.foldable:
            names = ", ".join(f"`{record.node}`" for record in check.foldable)
            lines.append(f"| `{check.model}` | {names} | ❌ {len(check.foldable)} foldable |")
        else:
            lines.append(f"| `{check.model}` | none | ✅ |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    api.make_fold_pass(args.only, args.skip)  # unknown rule names: usage error before any model is read
    console = Console(file=sys.stderr if args.json == "-" else sys.stdout, quiet=args.quiet)
    checks = check_models(args.models, args.only, args.skip)
    render(console, Console(file=sys.stderr), checks)
    if args.json:
        document = {
            "foldable_total": sum(len(check.foldable) for check in checks),
            "models": [check.to_dict() for check in checks],
        }
        write_json(args.json, document)
    if args.junit_xml:
        write_junit_xml(args.junit_xml, [JUnitSuite("bnfold check", junit_cases(checks))])
    append_step_summary(markdown(checks))
    return exit_code(checks)
