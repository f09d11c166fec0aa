"""GitHub Actions step summary: markdown appended to ``$GITHUB_STEP_SUMMARY`` when ``GITHUB_ACTIONS=true``."""

from __future__ import annotations

import os
from collections.abc import Mapping

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
        for metrics, judgement in zip(run.outputs, verdict.outputs, strict=True):
            errors = metrics.errors
            numbers = (
                [f"{errors.max_abs:.3g}", f"{errors.max_rel:.3g}", f"{errors.p99_abs:.3g}"]
                if errors is not None
                else ["–"] * 3
            )
            rows.append(
                f"| {run.requested} | `{metrics.name}` | {' | '.join(numbers)} | "
                f"{judgement.tolerance.atol:g} / {judgement.tolerance.rtol:g} | {_ICONS[judgement.verdict]} |"
            )
        if verdict.responsible:
            lines.append(f"- ❌ `{run.requested}`: first divergent fold **{verdict.responsible}**")
    if rows:
        lines += [
            "",
            "| provider | output | max abs err | max rel err | p99 abs err | atol / rtol | verdict |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    return "\n".join(lines) + "\n"
