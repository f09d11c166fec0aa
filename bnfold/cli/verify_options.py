"""Validation flags shared by ``bnfold fold`` and ``bnfold verify``, their translation to ``verify()``, rendering.

- :func:`add_verify_arguments` adds the flags to a parser;
- :func:`verify_from_args` runs :func:`bnfold.validate.verify` with them;
- :func:`render_verify_report` prints the per provider × output table with rich (and the float64 verdict);
- :class:`VerifyProgress` shows a long verification's progress (a bar on a terminal, lines otherwise);
- :func:`verify_exit_code` maps a report to the process exit code (1 on a mismatch or a timeout, else 0).
"""

from __future__ import annotations

import argparse
import math
import os
import time
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


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
    group.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up verifying after SECONDS: exit 1, as a failed verification (and `fold` writes nothing)",
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
        timeout_s=getattr(args, "timeout", None),
    )


def verify_from_args(
    args: argparse.Namespace,
    original: str | os.PathLike | object,
    candidate: str | os.PathLike | object,
    probes: Mapping[str, str] | None = None,
    *,
    candidate_label: str | None = None,
    progress: VerifyProgress | None = None,
) -> VerifyReport:
    """Run :func:`bnfold.validate.verify` with the flags of :func:`add_verify_arguments`.

    ``candidate_label`` names the candidate in the report (e.g. the final output path when ``candidate`` is
    a staged temporary file).
    """
    options = verify_options_from_args(args)
    return verify_with(original, candidate, options, probes=probes, candidate_label=candidate_label, progress=progress)


#: Non-terminal progress lines start once a verification has lasted this long (short runs stay quiet).
PROGRESS_AFTER_SECONDS = 2.0


class VerifyProgress:
    """A verification's progress: ``verify(progress=...)`` calls it after each iteration of each stage.

    On a terminal, a transient rich bar per stage; otherwise (CI logs) one plain line per iteration once the
    run has lasted :data:`PROGRESS_AFTER_SECONDS`. Use as a context manager (the bar is removed at the end).
    """

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled and not console.quiet
        self.started = time.perf_counter()
        self._progress = None
        self._tasks: dict[str, object] = {}

    def __enter__(self) -> VerifyProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if not self.console.is_terminal:
            if elapsed >= PROGRESS_AFTER_SECONDS:
                self.console.print(
                    f"verify: {stage} {done}/{total} ({elapsed:.1f} s)", markup=False, highlight=False, soft_wrap=True
                )
            return
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("verify: {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done)


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
    basis = " against float64" if any(verdict.basis == "float64" for verdict in report.verdicts) else ""
    return f"verification {_STYLE[report.verdict]}{basis}" + (f" ({'; '.join(parts)})" if parts else "")


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
    # With a float64 basis, the verdict column is the float64 rule's; the numbers stay the float32 comparison's.
    deciding = {judgement.name: judgement for judgement in verdict.float64_outputs}
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
        table.add_row(*row, _STYLE[deciding.get(metrics.name, judgement).verdict])
    return table


def _render_float64(console: Console, run: ProviderRun, verdict: ProviderVerdict) -> None:
    """The float64 verdict: engine and cost, per output the two distances to float64, the folds checked."""
    check = run.float64
    if check is None:
        return
    if check.unavailable is not None:
        console.print(f"[yellow]{run.requested}: no float64 verdict:[/] {check.unavailable}", soft_wrap=True)
        return
    console.print(
        f"{run.requested}: float64 reference used ({check.engine}; {check.iterations} iteration(s), "
        f"{check.elapsed_s:.2f} s)",
        highlight=False,
        soft_wrap=True,
    )
    judged = {judgement.name: judgement for judgement in verdict.float64_outputs}
    for truth in check.outputs:
        judgement = judged.get(truth.name)
        original = _number(truth.original.errors.max_abs if truth.original.errors else None)
        candidate = _number(truth.candidate.errors.max_abs if truth.candidate.errors else None)
        allowed = f"allowed {_number(judgement.tolerance.atol)} + {_number(judgement.tolerance.rtol)}·|ref|"
        state = _STYLE[judgement.verdict] if judgement is not None else "-"
        console.print(
            f"  {truth.name}: original {original} from float64, candidate {candidate} ({allowed}): {state}",
            highlight=False,
            soft_wrap=True,
        )
    if check.probes:
        diverging = sum(judgement.verdict is Verdict.FAILED for judgement in verdict.float64_probes)
        console.print(
            f"  folds checked one by one against float64: {len(check.probes)}, diverging: {diverging}",
            highlight=False,
            soft_wrap=True,
        )
    for judgement in (*verdict.float64_outputs, *verdict.float64_probes):
        for reason in judgement.reasons:
            console.print(f"  [red]{judgement.name}:[/] {reason}", highlight=False, soft_wrap=True)
    if check.note:
        console.print(f"  note: {check.note}", highlight=False, soft_wrap=True)


def render_verify_report(console: Console, report: VerifyReport, *, written: bool = True) -> None:
    """One table per provider (output × errors, smallest passing atol/rtol, tolerance, verdict), then notes.

    "atol needed" is the smallest atol that passes at the table's rtol, "rtol needed" the smallest rtol at its
    atol; the noise floor (non-CPU providers) is the original's own max abs difference provider vs CPU.
    ``written=False`` (``fold`` after a failure): the header does not name an output file that was never written.
    """
    candidate = report.candidate if written else f"the folded model (not written to {report.candidate})"
    console.print(f"verify: {candidate} against {report.original} ({report.iterations} iteration(s))", highlight=False)
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
        float64 = verdict.basis == "float64"
        for judgement in verdict.outputs:
            for reason in judgement.reasons:
                label = f"{run.requested} {judgement.name}" + (" (float32 table)" if float64 else "")
                style = "yellow" if float64 else "red"
                console.print(f"[{style}]{label}:[/] {reason}", highlight=False, soft_wrap=True)
        _render_float64(console, run, verdict)
        if verdict.responsible:
            others = [label for label in verdict.divergent if label != verdict.responsible]
            later = ""
            if others and not float64:
                listed = ", ".join(others) if len(others) <= 3 else f"{len(others)} folds"
                later = f" (downstream, as a consequence, also: {listed})"
            together = ""
            if len(verdict.responsible_folds) > 1:  # several folds wrote the layer where the divergence shows
                folds = ", ".join(verdict.responsible_folds)
                together = f" (measured at its output; the folds of {folds} all write it)"
            console.print(
                f"[bold red]{run.requested}: responsible fold: {verdict.responsible}[/]{together}{later}",
                soft_wrap=True,
            )
        elif verdict.verdict is Verdict.FAILED and run.probes:
            console.print(
                f"{run.requested}: no folded tensor diverges; the difference arises outside the folds", soft_wrap=True
            )
        if run.probe_note and verdict.verdict is Verdict.FAILED:
            console.print(f"{run.requested}: probes: {run.probe_note}", highlight=False, soft_wrap=True)
    console.print(_verdict_line(report), highlight=False, soft_wrap=True)
