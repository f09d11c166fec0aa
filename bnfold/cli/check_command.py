"""``bnfold check MODEL...``: list the BatchNormalization nodes that could still be folded (a CI gate).

Nothing is written: each model is folded in memory and only the report is kept. Exit codes: 0 nothing
foldable, 1 some model has a foldable BatchNormalization (with ``--fail-on-any-bn``: any BatchNormalization
at all, each listed with the reason it stays), 3 some model could not be read (the other models are still
checked and reported). In ``--json`` a BN that fold would fold has status ``"foldable"`` (it is not folded:
nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from bnfold import api
from bnfold.cli.arg_types import comma_list
from bnfold.cli.render import make_console, write_json
from bnfold.errors import ExitCode, InvalidModelError
from bnfold.files.output_plan import OutputPlan
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
    parser.add_argument(
        "--fail-on-any-bn",
        action="store_true",
        help="exit 1 when any BatchNormalization remains, foldable or not (each unfoldable one with its reason)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")


#: The status a BN that ``fold`` would fold has in ``check --json`` (``check`` folds nothing).
FOLDABLE = "foldable"


@dataclass(frozen=True)
class ModelCheck:
    """The outcome for one model: its fold report, or the reason it could not be read."""

    model: str
    report: FoldReport | None
    error: str | None

    @property
    def foldable(self) -> tuple:
        return self.report.folded if self.report is not None else ()

    @property
    def kept(self) -> tuple:
        """The BatchNormalization nodes no rule folds, each with its skip reason."""
        return self.report.skipped if self.report is not None else ()

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "error": self.error,
            "foldable": [{**record.to_dict(), "status": FOLDABLE} for record in self.foldable],
            "kept": [record.to_dict() for record in self.kept],
        }


def check_models(paths: list[str], only: list[str] | None, skip: list[str] | None) -> list[ModelCheck]:
    checks = []
    for path in paths:
        try:
            checks.append(ModelCheck(path, api.check(path, only=only, skip=skip), None))
        except InvalidModelError as error:
            checks.append(ModelCheck(path, None, str(error)))
    return checks


def exit_code(checks: list[ModelCheck], fail_on_any_bn: bool = False) -> int:
    if any(check.error is not None for check in checks):
        return int(ExitCode.INVALID_MODEL)
    if any(check.foldable or (fail_on_any_bn and check.kept) for check in checks):
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def _reason(record) -> str:
    return record.reason.value if record.reason else "-"


def render_kept(console: Console, check: ModelCheck) -> None:
    """``--fail-on-any-bn``: every BatchNormalization that stays, with the reason no rule folds it."""
    console.print(
        f"[bold red]{check.model}[/]: {len(check.kept)} BatchNormalization remain(s) that no rule folds",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for column in ("node", "graph", "reason", "detail"):
        table.add_column(column)
    for record in check.kept:
        table.add_row(record.node, record.graph, _reason(record), record.detail or "")
    console.print(table)


def render(console: Console, errors: Console, checks: list[ModelCheck], fail_on_any_bn: bool = False) -> None:
    """Foldable BatchNormalization per model on ``console`` (with ``fail_on_any_bn`` also the unfoldable
    ones and their reasons); unreadable models on ``errors``."""
    for check in checks:
        if check.error is not None:
            errors.print(f"bnfold: error: {check.error}", highlight=False, markup=False, soft_wrap=True)
            continue
        kept = len(check.report.skipped)
        kept_text = f"; {kept} BatchNormalization kept, each with a reason" if kept else ""
        if fail_on_any_bn and check.kept:
            render_kept(console, check)
        if not check.foldable:
            if not (fail_on_any_bn and check.kept):
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


def junit_cases(checks: list[ModelCheck], fail_on_any_bn: bool = False) -> tuple[JUnitCase, ...]:
    cases = []
    for check in checks:
        failure = None
        if check.error is not None:
            failure = f"cannot check: {check.error}"
        elif check.foldable:
            names = ", ".join(f"{record.node} (into {record.producer})" for record in check.foldable)
            failure = f"{len(check.foldable)} foldable BatchNormalization: {names}"
        elif fail_on_any_bn and check.kept:
            names = ", ".join(
                f"{record.node} ({record.reason.value if record.reason else '-'})" for record in check.kept
            )
            failure = f"{len(check.kept)} BatchNormalization remain(s): {names}"
        cases.append(JUnitCase("bnfold.check", check.model, failure=failure))
    return tuple(cases)


def markdown(checks: list[ModelCheck], fail_on_any_bn: bool = False) -> str:
    lines = ["### bnfold check", "", "| model | foldable BatchNormalization | result |", "|---|---|---|"]
    for check in checks:
        if check.error is not None:
            lines.append(f"| `{check.model}` | – | ❌ {check.error} |")
        elif check.foldable:
            names = ", ".join(f"`{record.node}`" for record in check.foldable)
            lines.append(f"| `{check.model}` | {names} | ❌ {len(check.foldable)} foldable |")
        elif fail_on_any_bn and check.kept:
            names = ", ".join(f"`{record.node}`" for record in check.kept)
            lines.append(f"| `{check.model}` | none ({names} remain) | ❌ {len(check.kept)} BatchNormalization left |")
        else:
            lines.append(f"| `{check.model}` | none | ✅ |")
    return "\n".join(lines) + "\n"


def _quiet_line(check: ModelCheck, fail_on_any_bn: bool) -> str | None:
    """The one line ``-q`` still prints for a model that fails the gate (unreadable models have theirs)."""
    if check.error is not None:
        return None
    if check.foldable:
        records, what = check.foldable, "foldable BatchNormalization"
    elif fail_on_any_bn and check.kept:
        records, what = check.kept, "BatchNormalization remain(s)"
    else:
        return None
    names = ", ".join(record.node for record in records[:3]) + (
        f" and {len(records) - 3} more" if len(records) > 3 else ""
    )
    return f"bnfold: check: {check.model}: {len(records)} {what}: {names}"


def run(args: argparse.Namespace) -> int:
    api.make_fold_pass(args.only, args.skip)  # unknown rule names: usage error before any model is read
    plan = OutputPlan()
    for model in args.models:
        plan.read_model(model)
    plan.write(args.json, "--json").write(args.junit_xml, "--junit-xml").check()  # before any model is read
    console = make_console(file=sys.stderr if args.json == "-" else sys.stdout, quiet=args.quiet)
    errors = make_console(stderr=True)
    checks = check_models(args.models, args.only, args.skip)
    any_bn = args.fail_on_any_bn
    render(console, errors, checks, any_bn)
    if args.json:
        document = {
            "foldable_total": sum(len(check.foldable) for check in checks),
            "remaining_total": sum(len(check.foldable) + len(check.kept) for check in checks),
            "models": [check.to_dict() for check in checks],
        }
        write_json(args.json, document)
    if args.junit_xml:
        write_junit_xml(args.junit_xml, [JUnitSuite("bnfold check", junit_cases(checks, any_bn))])
    append_step_summary(markdown(checks, any_bn))
    if args.quiet:  # the tables were silenced: still say, in one line per model, why the gate fails
        for check in checks:
            line = _quiet_line(check, any_bn)
            if line is not None:
                errors.print(line, markup=False, highlight=False, soft_wrap=True)
    return exit_code(checks, any_bn)
