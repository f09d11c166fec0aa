"""Rich rendering of fold results. Only the CLI prints; this module turns report objects into tables and lines,
and writes the machine-readable reports (:func:`write_json`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bnfold.errors import UsageError
from bnfold.report import FoldReport, FoldStatus

if TYPE_CHECKING:
    from bnfold.recalibration import RecalibrationReport
    from bnfold.workflow import FoldOutcome

T = TypeVar("T")

_STATUS_STYLE = {
    FoldStatus.FOLDED: "[green]folded[/]",
    FoldStatus.LOWERED: "[cyan]lowered[/]",
    FoldStatus.SKIPPED: "[yellow]skipped[/]",
}


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_fold_summary(
    console: Console,
    report: FoldReport,
    *,
    source: str,
    destination: str | None,
    size_before: int,
    size_after: int | None,
    seconds: float,
) -> None:
    """The summary table: BN folded/total, skipped by reason, nodes and file sizes before/after, time."""
    table = Table(title=f"bnfold: {source}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("BatchNormalization folded", f"{len(report.folded)} / {len(report.records)}")
    if report.frozen_inputs:
        table.add_row("frozen graph inputs", _name_list(report.frozen_inputs))
    if report.lowered:
        table.add_row("  lowered to Mul + Add", str(len(report.lowered)))
    for reason, count in report.skipped_by_reason.items():
        table.add_row(f"  skipped: {reason.value}", str(count))
    table.add_row("nodes", f"{report.nodes_before} → {report.nodes_after}")
    after = human_bytes(size_after) if size_after is not None else "(not written)"
    table.add_row("size", f"{human_bytes(size_before)} → {after}")
    table.add_row("output", destination or "(not written)")
    table.add_row("time", f"{seconds:.2f} s")
    console.print(table)
    if not report.records:
        console.print(NO_BATCH_NORM_NOTE)


NO_BATCH_NORM_NOTE = (
    "This model has no BatchNormalization: nothing to fold. Both torch exporters already fuse Conv+BN in eval"
    " mode by default (TorchScript's constant folding, dynamo's onnxscript optimizer). If BNs were expected,"
    " export with training=torch.onnx.TrainingMode.PRESERVE (TorchScript) or dynamo=True, optimize=False, then"
    " fold with bnfold to get a report and a verified result."
)


def _name_list(names: tuple[str, ...], shown: int = 5) -> str:
    listed = ", ".join(names[:shown])
    return f"{len(names)}: {listed}" + (f", … (+{len(names) - shown} more)" if len(names) > shown else "")


def render_fold_records(console: Console, report: FoldReport) -> None:
    """One row per BatchNormalization: what happened and why (``-v``)."""
    table = Table(title="BatchNormalization nodes", title_justify="left")
    for column in ("node", "graph", "producer", "status", "reason / detail", "scale range", "precision cost"):
        table.add_column(column)
    for record in report.records:
        scale = (
            f"[{record.scale_min:.3g}, {record.scale_max:.3g}]"
            if record.scale_min is not None and record.scale_max is not None
            else "-"
        )
        reason = f"{record.reason.value}: {record.detail}" if record.reason else record.detail
        status = _STATUS_STYLE[record.status]
        producer = f"{record.producer} {record.producer_node!r}" if record.producer else "-"
        cost = f"{record.precision_cost:.3g}x" if record.precision_cost is not None else "-"
        table.add_row(record.node, record.graph, producer, status, reason, scale, cost)
    console.print(table)


def write_json(target: str, document: dict[str, Any] | str, *, flag: str = "--json") -> None:
    """Write a JSON report (a document, or text already JSON) to ``target``; ``-``: stdout.

    The one JSON writer of the CLI: every ``--json`` goes through it. An unwritable path is a usage error.
    """
    text = document if isinstance(document, str) else json.dumps(document, indent=2)
    text = text if text.endswith("\n") else text + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{flag} {target}: cannot write ({error.strerror or error})") from error


def kept_data_line(kept: tuple[str, ...] | list[str], model: str) -> str | None:
    """The note after an in-place write that left the input's old data files (``None`` when none were)."""
    if not kept:
        return None
    names = ", ".join(kept)
    return f"kept {names}: {model} no longer reads it, a copy of the model may; delete it when nothing does"


def render_batch_outcome(console: Console, outcome: FoldOutcome, *, verbose: bool) -> None:
    """One line for one model of a batch: ``✓ a.onnx → out/a.onnx: 3/3 BN folded, sizes, time, verdict``."""
    source = outcome.source
    report = outcome.report
    if report is None:
        console.print(Text.assemble(("✗ ", "bold red"), f"{source}: error: {outcome.error}"), soft_wrap=True)
        return
    parts = [f"{len(report.folded)}/{len(report.records)} BN folded"]
    if outcome.size_before is not None:
        after = human_bytes(outcome.size_after) if outcome.size_after is not None else "(not written)"
        parts.append(f"{human_bytes(outcome.size_before)} → {after}")
    parts.append(f"{outcome.seconds:.2f} s")
    if outcome.verify_verdict is not None:
        parts.append("verify FAILED" if outcome.verify_verdict == "failed" else f"verify {outcome.verify_verdict}")
    if outcome.kept_failed is not None:
        parts.append(f"kept as {outcome.kept_failed}")
    if outcome.kept_data:
        parts.append(f"old data kept: {', '.join(outcome.kept_data)}")
    mark = ("✓ ", "bold green") if outcome.ok else ("✗ ", "bold red")
    arrow = f" → {outcome.written}" if outcome.written is not None else " (not written)"
    console.print(Text.assemble(mark, f"{source}{arrow}: " + ", ".join(parts)), soft_wrap=True)
    if verbose:
        render_fold_records(console, report)


def render_batch_total(console: Console, totals: dict[str, Any]) -> None:
    """The batch's last line: models that succeeded (how many of them had a BN folded: a model with nothing to fold
    succeeds without being "folded"), failed, BN folded, time (``totals``: see ``batch_totals``)."""
    style = "bold green" if totals["failed"] == 0 else "bold red"
    console.print(
        Text.assemble(
            ("total: ", "bold"),
            (f"{totals['succeeded']}/{totals['models']} models succeeded", style),
            f" ({totals.get('with_folds', totals['succeeded'])} with a BN folded)",
            f", {totals['failed']} failed, {totals['batch_norm_folded']}/{totals['batch_norm_total']} BN folded, "
            f"{totals['seconds']:.2f} s",
        ),
        soft_wrap=True,
    )


def render_recalibration(console: Console, report: RecalibrationReport, output: Path | str, *, verbose: bool) -> None:
    """One line: what was recalibrated, how, and where it was written; with ``verbose`` a row per BN."""
    mode = "update_bn (match-torch)" if report.mode == "match_torch" else f"pooled, {report.convention} variance"
    console.print(
        f"recalibrated {len(report.recalibrated)} BatchNormalization ({mode}; {report.batches} batch(es), "
        f"{report.passes} pass(es)); skipped {len(report.skipped)}: {escape(str(output))}",
        soft_wrap=True,
    )
    if not verbose:
        return
    table = Table("BatchNormalization", "status", "generation", "channels", "max |Δmean|", "max var ratio", "reason")
    for record in report.records:
        table.add_row(
            escape(record.node),
            record.status,
            "" if record.generation is None else str(record.generation),
            "" if record.channels is None else str(record.channels),
            "" if record.max_mean_change is None else f"{record.max_mean_change:.3g}",
            "" if record.max_var_ratio is None else f"{record.max_var_ratio:.3g}",
            escape(record.reason or ""),
        )
    console.print(table)


def render_lowering(console: Console, count: int, output: Path) -> None:
    """``bnfold lower-training``: how many training-mode BatchNormalization nodes were lowered, and where to."""
    if count:
        noun = "node" if count == 1 else "nodes"
        console.print(f"lowered {count} training-mode BatchNormalization {noun}: {escape(str(output))}", soft_wrap=True)
    else:
        console.print(
            f"no training-mode BatchNormalization found; wrote the model unchanged: {escape(str(output))}",
            soft_wrap=True,
        )


# The batch progress bar appears only when the work has lasted this long (and stdout is a terminal).
PROGRESS_AFTER_SECONDS = 1.0


def with_progress(console: Console, results: Iterator[T], total: int, *, quiet: bool) -> Iterator[T]:
    """Yield ``results``; after :data:`PROGRESS_AFTER_SECONDS` on a terminal, also show a progress bar.

    The bar appears at the first result after the threshold (or never when all is done before it).
    """
    if quiet or not console.is_terminal:
        yield from results
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    progress: Progress | None = None
    done = 0
    try:
        for result in results:
            done += 1
            if progress is None and time.perf_counter() - started > PROGRESS_AFTER_SECONDS and done < total:
                progress = Progress(
                    TextColumn("folding"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                progress.start()
                task = progress.add_task("models", total=total, completed=done - 1)
            yield result
            if progress is not None:
                progress.update(task, completed=done)
    finally:
        if progress is not None:
            progress.stop()


# --- consoles for logs, and the one-line failure (issue 15) ---------------------------------------------------

#: The width of a console that is not a terminal: wide enough that no table ever truncates a name.
LOG_WIDTH = 100_000


def make_console(*, stderr: bool = False, file: Any = None, quiet: bool = False, highlight: bool = True) -> Console:
    """A console for the CLI's output.

    On a terminal it wraps at the terminal's width. Without one (a pipe, a CI log) it never wraps or truncates:
    rich would otherwise fit every table into ``COLUMNS`` (80 by default) and cut node names, paths and
    messages with "…". ``NO_COLOR`` (any non-empty value) turns colour off, as rich's default does.
    """
    console = Console(stderr=stderr, file=file, quiet=quiet, highlight=highlight)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


def failure_line(report: Any, *, subject: str, nothing_written: bool, kept: str | None = None) -> str | None:
    """One line naming what failed in a verification ``report`` (a ``VerifyReport``), or ``None`` if nothing did.

    ``subject`` names the model (or pair of models); ``nothing_written`` adds that no output was written.
    Printed on stderr even with ``-q``, so that a quiet CI step still says why it failed.
    """
    if not report.failed:
        return None
    parts = [f"the interfaces differ ({problem})" for problem in report.problems]
    for verdict in report.verdicts:
        if verdict.verdict.value == "failed":
            parts.append(f"{verdict.requested}: " + "; ".join(verdict.reasons or ("failed",)))
    line = f"bnfold: {subject}: verification failed: " + "; ".join(parts)
    if nothing_written:
        line += "; nothing was written" + (f" (the folded model is kept as {kept} for inspection)" if kept else "")
    return " ".join(line.split())


def render_failure_line(
    errors: Console, report: Any, *, subject: str, nothing_written: bool, kept: str | None = None
) -> None:
    """Print :func:`failure_line` on ``errors`` (a stderr console that ``-q`` does not silence)."""
    line = failure_line(report, subject=subject, nothing_written=nothing_written, kept=kept)
    if line is not None:
        errors.print(line, markup=False, highlight=False, soft_wrap=True)
