"""Validation flags shared by ``bnfold fold`` and ``bnfold verify``, their translation to ``verify()``, rendering.

- :func:`add_verify_arguments` adds the flags to a parser;
- :func:`verify_from_args` runs :func:`bnfold.validate.verify` with them;
- :func:`render_verify_report` prints the per provider × output table with rich;
- :func:`verify_exit_code` maps a report to the process exit code (1 on a mismatch, else 0).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.table import Table

from bnfold.cli.arg_types import positive_int
from bnfold.errors import ExitCode
from bnfold.validate.inputs import DEFAULT_ITERATIONS
from bnfold.validate.options import VerifyOptions, verify_with
from bnfold.validate.report import ProviderRun, ProviderVerdict, Verdict, VerifyReport
from bnfold.validate.tolerances import DEFAULT_TOLERANCES, ToleranceTable

_STYLE = {
    Verdict.PASSED: "[green]passed[/]",
    Verdict.FAILED: "[bold red]FAILED[/]",
    Verdict.SKIPPED: "[yellow]SKIPPED[/]",
}


def _provider_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as cpu,cuda")
    return names


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:D0,D1,...`` (the last ``:`` separates, so names may contain ``:``)."""
    name, separator, dims = text.rpartition(":")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:D0,D1,..., got {text!r}")
    try:
        shape = tuple(int(size) for size in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer sizes in {text!r}") from None
    if any(size < 0 for size in shape):
        raise argparse.ArgumentTypeError(f"sizes must be >= 0 in {text!r}")
    return name, shape


def _dim(text: str) -> tuple[str, int]:
    """``DIM_PARAM=SIZE``."""
    name, separator, size = text.rpartition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}")
    try:
        value = int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer size in {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0 in {text!r}")
    return name, value


def _tolerance(text: str) -> tuple[str | None, float]:
    """``VALUE`` (every output) or ``OUTPUT:VALUE``."""
    name, separator, number = text.rpartition(":")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or OUTPUT:NUMBER, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"tolerance must be a finite number >= 0, got {text!r}")
    if separator and not name:
        raise argparse.ArgumentTypeError(f"missing output name in {text!r}")
    return (name or None), value


def _defaults_text() -> str:
    return ", ".join(f"{dtype} {_number(t.atol)}/{_number(t.rtol)}" for dtype, t in DEFAULT_TOLERANCES.items())


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the validation flags (used by ``bnfold fold`` and ``bnfold verify``) in their own group."""
    group = parser.add_argument_group(
        "verification",
        "The reference is the original model on onnxruntime CPU with graph optimisations disabled; the "
        "candidate runs on each --providers entry, also unoptimised.",
    )
    group.add_argument(
        "--providers",
        type=_provider_list,
        default=("cpu",),
        metavar="LIST",
        help="comma-separated execution providers for the candidate: cpu, cuda (default: cpu)",
    )
    group.add_argument(
        "--require-provider",
        action="store_true",
        help="exit 4 when a requested provider is not really available (default: report it as SKIPPED)",
    )
    group.add_argument(
        "--cuda-tf32",
        action="store_true",
        help="allow TF32 on CUDA (deployment reality; default off so the check measures the fold)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: 0)")
    group.add_argument(
        "--iterations",
        type=positive_int,
        default=DEFAULT_ITERATIONS,
        help=f"input batches to compare (default: {DEFAULT_ITERATIONS}; dynamic dims alternate two sizes)",
    )
    group.add_argument(
        "--input-shapes",
        type=_input_shape,
        action="append",
        default=[],
        metavar="NAME:D0,D1,...",
        help="the shape of input NAME (repeatable), e.g. input:1,3,224,224",
    )
    group.add_argument(
        "--dim",
        type=_dim,
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="the size of symbolic dim NAME everywhere (repeatable), e.g. batch=4",
    )
    for which in ("atol", "rtol"):
        group.add_argument(
            f"--{which}",
            type=_tolerance,
            action="append",
            default=[],
            metavar="[OUTPUT:]VALUE",
            help=f"{which} for every floating output, or for OUTPUT only (repeatable)"
            + ("" if which == "rtol" else f"; defaults by dtype (atol/rtol): {_defaults_text()}; integers exact"),
        )
    group.add_argument("--load-inputs", metavar="FILE.npz", help="compare on these inputs instead of generated ones")
    group.add_argument("--save-inputs", metavar="FILE.npz", help="save the inputs used, to reproduce a run")


def tolerances_from_args(args: argparse.Namespace) -> ToleranceTable:
    """The default table with the ``--atol``/``--rtol`` overrides (the last value given for a target wins)."""
    return verify_options_from_args(args).tolerances()


def verify_options_from_args(args: argparse.Namespace) -> VerifyOptions:
    """The :class:`~bnfold.validate.options.VerifyOptions` the flags of :func:`add_verify_arguments` ask for."""
    return VerifyOptions(
        providers=tuple(args.providers),
        require_provider=args.require_provider,
        seed=args.seed,
        iterations=args.iterations,
        input_shapes=tuple((name, tuple(shape)) for name, shape in args.input_shapes),
        dims=tuple(args.dim),
        atol=tuple(getattr(args, "atol", None) or ()),
        rtol=tuple(getattr(args, "rtol", None) or ()),
        load_inputs=args.load_inputs,
        save_inputs=args.save_inputs,
        cuda_tf32=args.cuda_tf32,
    )


def verify_from_args(
    args: argparse.Namespace,
    original: str | os.PathLike | object,
    candidate: str | os.PathLike | object,
    probes: Mapping[str, str] | None = None,
    *,
    candidate_label: str | None = None,
) -> VerifyReport:
    """Run :func:`bnfold.validate.verify` with the flags of :func:`add_verify_arguments`.

    ``candidate_label`` names the candidate in the report (e.g. the final output path when ``candidate`` is
    a staged temporary file).
    """
    options = verify_options_from_args(args)
    return verify_with(original, candidate, options, probes=probes, candidate_label=candidate_label)


def verify_exit_code(report: VerifyReport) -> int:
    """1 when anything failed; 0 when everything passed or a provider was only skipped."""
    return int(ExitCode.FAILED if report.failed else ExitCode.OK)


def _number(value: float | None) -> str:
    """Compact, at most 7 characters for finite values: ``0``, ``0.0012``, ``4.6e-07``, ``inf``."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.2g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.1e}"
    return text.replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e+")


def _verdict_line(report: VerifyReport) -> str:
    by_verdict: dict[Verdict, list[str]] = {}
    for verdict in report.verdicts:
        by_verdict.setdefault(verdict.verdict, []).append(verdict.requested)
    parts = [f"{_STYLE[verdict]} on {', '.join(names)}" for verdict, names in by_verdict.items()]
    if report.problems:
        parts.insert(0, f"{_STYLE[Verdict.FAILED]}: the interfaces differ")
    return f"verification {_STYLE[report.verdict]}" + (f" ({'; '.join(parts)})" if parts else "")


def _provider_table(report: VerifyReport, run: ProviderRun, verdict: ProviderVerdict) -> Table:
    tf32 = "" if run.cuda_tf32 is None else f", TF32 {'on' if run.cuda_tf32 else 'off'}"
    table = Table(
        title=f"{run.requested}: executed by {', '.join(run.executed_providers)}{tf32}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    headers = ["output", "max abs", "p99 abs", "max rel", "atol needed", "rtol needed", "atol/rtol"]
    if run.noise_floor:
        headers.append("noise floor")
    for header in [*headers, "verdict"]:
        numeric = header not in ("output", "verdict")
        table.add_column(header, justify="right" if numeric else "left", min_width=11 if header == "atol/rtol" else 7)
    noise = {metrics.name: metrics.errors for metrics in run.noise_floor}
    for metrics, judgement in zip(run.outputs, verdict.outputs, strict=True):
        errors = metrics.errors
        row = [
            metrics.name,
            _number(errors.max_abs if errors else None),
            _number(errors.p99_abs if errors else None),
            _number(errors.max_rel if errors else None),
            _number(judgement.required_atol),
            _number(judgement.required_rtol),
            f"{_number(judgement.tolerance.atol)}/{_number(judgement.tolerance.rtol)}",
        ]
        if run.noise_floor:
            floor = noise.get(metrics.name)
            row.append(_number(floor.max_abs) if floor is not None else "-")
        table.add_row(*row, _STYLE[judgement.verdict])
    return table


def render_verify_report(console: Console, report: VerifyReport) -> None:
    """One table per provider (output × errors, smallest passing atol/rtol, tolerance, verdict), then notes.

    "atol needed" is the smallest atol that passes at the table's rtol, "rtol needed" the smallest rtol at its
    atol; the noise floor (non-CPU providers) is the original's own max abs difference provider vs CPU.
    """
    console.print(
        f"verify: {report.candidate} against {report.original} ({report.iterations} iteration(s))", highlight=False
    )
    for problem in report.problems:
        console.print(f"[bold red]interface:[/] {problem}", highlight=False, soft_wrap=True)
    for run, verdict in report.results():
        if verdict.verdict is Verdict.SKIPPED:
            console.print(
                f"[yellow]{run.requested} SKIPPED[/] (not verified): {run.skipped_reason}",
                highlight=False,
                soft_wrap=True,
            )
            continue
        if run.run_error is not None:
            console.print(
                f"[bold red]{run.requested} FAILED[/]: the candidate did not run: {run.run_error}", highlight=False
            )
            continue
        console.print(_provider_table(report, run, verdict))
        for judgement in verdict.outputs:
            for reason in judgement.reasons:
                console.print(f"[red]{run.requested} {judgement.name}:[/] {reason}", highlight=False, soft_wrap=True)
        if verdict.responsible:
            others = [label for label in verdict.divergent if label != verdict.responsible]
            later = ""
            if others:
                listed = ", ".join(others) if len(others) <= 3 else f"{len(others)} folds"
                later = f" (downstream, as a consequence, also: {listed})"
            console.print(
                f"[bold red]{run.requested}: responsible fold: {verdict.responsible}[/]{later}", soft_wrap=True
            )
        elif verdict.verdict is Verdict.FAILED and run.probes:
            console.print(
                f"{run.requested}: no folded tensor diverges; the difference arises outside the folds", soft_wrap=True
            )
        if run.probe_note and verdict.verdict is Verdict.FAILED:
            console.print(f"{run.requested}: probes: {run.probe_note}", highlight=False, soft_wrap=True)
    console.print(_verdict_line(report), highlight=False, soft_wrap=True)
