"""JUnit XML for CI systems: one ``<testcase>`` per model × provider × output.

The writer is generic (:class:`JUnitSuite`, :class:`JUnitCase`) so ``fold``, ``verify`` and ``check`` share it;
:func:`verify_cases` turns a :class:`~bnfold.validate.report.VerifyReport` into cases.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from bnfold.errors import UsageError
from bnfold.validate.report import Verdict, VerifyReport


@dataclasses.dataclass(frozen=True)
class JUnitCase:
    """One test case: ``failure`` or ``skipped`` hold the message (both ``None``: passed)."""

    classname: str
    name: str
    time_s: float = 0.0
    failure: str | None = None
    skipped: str | None = None
    details: str | None = None


@dataclasses.dataclass(frozen=True)
class JUnitSuite:
    name: str
    cases: tuple[JUnitCase, ...]


def verify_cases(report: VerifyReport, *, classname: str | None = None) -> tuple[JUnitCase, ...]:
    """Cases for one verification: ``<provider>/<output>`` per provider and output of the original.

    Interface problems give one failing ``interface`` case. ``classname`` defaults to the candidate's label.
    """
    classname = classname or report.candidate
    cases: list[JUnitCase] = []
    if report.problems:
        cases.append(JUnitCase(classname, "interface", failure="; ".join(report.problems)))
    for run, verdict in report.results():
        per_output_time = run.elapsed_s / max(len(report.outputs), 1)
        # the judgements that decided: the float64 rule's when it was applied (see ProviderVerdict.basis)
        deciding = verdict.float64_outputs if verdict.basis == "float64" else verdict.outputs
        judgements = {judgement.name: judgement for judgement in deciding}
        outputs_pass = all(judgement.verdict is not Verdict.FAILED for judgement in deciding)
        metrics = {metric.name: metric for metric in run.outputs}
        for output in report.outputs:
            name = f"{run.requested}/{output}"
            if verdict.verdict is Verdict.SKIPPED:
                cases.append(JUnitCase(classname, name, skipped=run.skipped_reason))
                continue
            if run.run_error is not None:
                cases.append(JUnitCase(classname, name, per_output_time, failure=verdict.reasons[0]))
                continue
            judgement = judgements[output]
            failure = None
            if judgement.verdict is Verdict.FAILED:
                failure = "; ".join(judgement.reasons)
                if verdict.responsible:
                    failure += f"; first divergent fold: {verdict.responsible}"
                    if len(verdict.responsible_folds) > 1:
                        failure += f" (written together by the folds of {', '.join(verdict.responsible_folds)})"
            elif verdict.verdict is Verdict.FAILED and outputs_pass:  # a fold diverges that the outputs hide
                failure = "; ".join(verdict.reasons)
            errors = metrics[output].errors
            details = None
            if errors is not None:
                details = (
                    f"max_abs={errors.max_abs:.3g} p99_abs={errors.p99_abs:.3g} max_rel={errors.max_rel:.3g} "
                    f"atol={judgement.tolerance.atol:g} rtol={judgement.tolerance.rtol:g} "
                    f"executed_providers={','.join(run.executed_providers)}"
                )
            cases.append(JUnitCase(classname, name, per_output_time, failure=failure, details=details))
    return tuple(cases)


def junit_xml(suites: Sequence[JUnitSuite]) -> str:
    """The JUnit XML document for ``suites``."""
    root = ElementTree.Element("testsuites")
    for suite in suites:
        element = ElementTree.SubElement(
            root,
            "testsuite",
            name=suite.name,
            tests=str(len(suite.cases)),
            failures=str(sum(case.failure is not None for case in suite.cases)),
            skipped=str(sum(case.skipped is not None for case in suite.cases)),
            errors="0",
            time=f"{sum(case.time_s for case in suite.cases):.4f}",
        )
        for case in suite.cases:
            case_element = ElementTree.SubElement(
                element, "testcase", classname=case.classname, name=case.name, time=f"{case.time_s:.4f}"
            )
            if case.failure is not None:
                ElementTree.SubElement(case_element, "failure", message=case.failure).text = case.failure
            elif case.skipped is not None:
                ElementTree.SubElement(case_element, "skipped", message=case.skipped)
            if case.details:
                ElementTree.SubElement(case_element, "system-out").text = case.details
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit_xml(path: str | os.PathLike, suites: Sequence[JUnitSuite]) -> None:
    """Write :func:`junit_xml` of ``suites`` to ``path``."""
    try:
        Path(path).write_text(junit_xml(suites), encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--junit-xml {path}: cannot write ({error.strerror or error})") from error
