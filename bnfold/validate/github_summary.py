"""GitHub Actions step summary: markdown appended to ``$GITHUB_STEP_SUMMARY`` when ``GITHUB_ACTIONS=true``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bnfold.validate.report import Verdict, VerifyReport

_ICONS = {Verdict.PASSED: "✅ passed", Verdict.FAILED: "❌ failed", Verdict.SKIPPED: "⚠️ skipped"}


def step_summary_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The summary file to append to, or ``None`` outside GitHub Actions."""
    environ = os.environ if environ is None else environ
    if environ.get("GITHUB_ACTIONS") != "true":
        return None
    return environ.get("GITHUB_STEP_SUMMARY") or None


def append_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> bool:
    """Append ``markdown`` to the step summary; returns whether it was written (never raises on I/O errors)."""
    path = step_summary_path(environ)
    if path is None:
        return False
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown.rstrip("\n") + "\n\n")
    except OSError:
        return False
    return True


def _max_abs(metrics: Any) -> str:
    return "–" if metrics.errors is None else f"{metrics.errors.max_abs:.3g}"


def verify_markdown(report: VerifyReport) -> str:
    """A markdown section: verdict, then a table per provider × output, then the fold held responsible."""
    lines = [
        f"### bnfold verify: {_ICONS[report.verdict]}",
        "",
        f"`{report.candidate}` against `{report.original}` ({report.iterations} iteration(s))",
        "",
    ]
    for problem in report.problems:
        lines.append(f"- ❌ {problem}")
    rows = []
    for run, verdict in report.results():
        if verdict.verdict is Verdict.SKIPPED:
            lines.append(f"- ⚠️ `{run.requested}` skipped: {run.skipped_reason}")
            continue
        if run.run_error is not None:
            lines.append(f"- ❌ `{run.requested}`: {run.run_error}")
            continue
        deciding = {judgement.name: judgement for judgement in verdict.float64_outputs}  # float64 basis only
        for metrics, judgement in zip(run.outputs, verdict.outputs, strict=True):
            decided = deciding.get(metrics.name, judgement)
            errors = metrics.errors
            numbers = (
                [f"{errors.max_abs:.3g}", f"{errors.max_rel:.3g}", f"{errors.p99_abs:.3g}"]
                if errors is not None
                else ["–"] * 3
            )
            rows.append(
                f"| {run.requested} | `{metrics.name}` | {' | '.join(numbers)} | "
                f"{judgement.tolerance.atol:g} / {judgement.tolerance.rtol:g} | {_ICONS[decided.verdict]} |"
            )
        if verdict.responsible:
            lines.append(f"- ❌ `{run.requested}`: first divergent fold **{verdict.responsible}**")
            if len(verdict.responsible_folds) > 1:
                lines[-1] += f" (its output is written by the folds of {', '.join(verdict.responsible_folds)})"
        if run.float64 is not None and run.float64.unavailable is None:
            figures = ", ".join(
                f"`{truth.name}` original {_max_abs(truth.original)}, candidate {_max_abs(truth.candidate)}"
                for truth in run.float64.outputs
            )
            lines.append(
                f"- `{run.requested}`: judged against float64 ({run.float64.engine}, {run.float64.elapsed_s:.2f} s): "
                f"distance to float64 {figures}"
            )
    if rows:
        lines += [
            "",
            "| provider | output | max abs err | max rel err | p99 abs err | atol / rtol | verdict |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    return "\n".join(lines) + "\n"


def fold_markdown(report: Any, verification: VerifyReport | None, *, source: str, written: str | None) -> str:
    """The summary of one ``bnfold fold``: the fold counts (folded/total, lowered, skipped by reason, nodes),
    where the model went, then the verification section (:func:`verify_markdown`) when it ran.

    ``report`` is the :class:`~bnfold.report.FoldReport`; ``written`` the output path, ``None`` if nothing
    was written.
    """
    icon = "✅" if verification is None or not verification.failed else "❌"
    lines = [
        f"### bnfold fold: {icon} `{source}`",
        "",
        "| | |",
        "|---|---|",
        f"| BatchNormalization folded | {len(report.folded)} / {len(report.records)} |",
    ]
    if report.lowered:
        lines.append(f"| lowered to Mul + Add | {len(report.lowered)} |")
    for reason, count in report.skipped_by_reason.items():
        lines.append(f"| skipped: {reason.value} | {count} |")
    lines.append(f"| nodes | {report.nodes_before} → {report.nodes_after} |")
    lines.append(f"| output | {f'`{written}`' if written else 'not written'} |")
    markdown = "\n".join(lines) + "\n"
    if verification is not None:
        markdown += "\n" + verify_markdown(verification)
    return markdown
