"""Rich rendering of fold results. Only the CLI prints; this module turns report objects into tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bnfold.report import FoldReport, FoldStatus

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


def render_fold_records(console: Console, report: FoldReport) -> None:
    """One row per BatchNormalization: what happened and why (``-v``)."""
    table = Table(title="BatchNormalization nodes", title_justify="left")
    for column in ("node", "graph", "producer", "status", "reason / detail", "scale range"):
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
        table.add_row(record.node, record.graph, producer, status, reason, scale)
    console.print(table)
