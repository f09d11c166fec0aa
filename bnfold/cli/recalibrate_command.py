"""``bnfold recalibrate MODEL --data PATH -o OUT``: re-estimate BN running statistics from data, optionally fold."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bnfold.cli.render import failure_line, kept_data_line, render_recalibration, write_json
from bnfold.errors import ExitCode, UsageError
from bnfold.files import SOURCE_FILES_META, load_model, stage_model
from bnfold.files.output_plan import MODEL_OUTPUT, OutputPlan
from bnfold.runtime import require_onnxruntime

if TYPE_CHECKING:  # the API imports onnxruntime: keep `bnfold --help` light
    import onnx_ir as ir

    from bnfold.validate.report import VerifyReport


NAME = "recalibrate"
HELP = (
    "re-estimate the running mean/var of every inference-mode BatchNormalization from sample data "
    "(exact pooled statistics, or torch's update_bn with --match-torch), optionally fold afterwards"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX model")
    parser.add_argument(
        "--data",
        required=True,
        help="an .npz file (one batch, arrays keyed by input name) or a directory of such files (one batch each)",
    )
    parser.add_argument("-o", "--output", help="where to write the recalibrated model")
    parser.add_argument("--in-place", action="store_true", help="overwrite MODEL (instead of -o)")
    parser.add_argument(
        "--fold",
        action="store_true",
        help="fold afterwards and verify the folded model against the recalibrated one on CPU (exit 1 on mismatch)",
    )
    parser.add_argument(
        "--convention",
        choices=("onnx", "torch"),
        default=None,
        help="variance stored: onnx = biased (default), torch = unbiased",
    )
    parser.add_argument(
        "--match-torch",
        action="store_true",
        help="reproduce torch.optim.swa_utils.update_bn: average of per-batch statistics, unbiased variance",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every BatchNormalization")


def _output_path(args: argparse.Namespace, source: Path) -> str:
    """The output path as given (checked by the output plan)."""
    if args.in_place:
        if args.output is not None and Path(args.output).resolve() != source.resolve():
            raise UsageError("give either -o/--output or --in-place, not both")
        return args.model
    if args.output is None:
        raise UsageError("give -o/--output OUT (or --in-place to overwrite the model)")
    return args.output


def run(args: argparse.Namespace) -> int:
    require_onnxruntime("bnfold recalibrate")  # (recalibration runs the model: check first, for a one-line error)
    from bnfold.api import fold
    from bnfold.recalibration import NpzBatches, recalibrate

    if args.match_torch and args.convention == "onnx":
        raise UsageError("--match-torch stores torch's unbiased variance; it cannot be combined with --convention onnx")
    source = Path(args.model)
    output = _output_path(args, source)
    plan = OutputPlan().read(source, "the input").write(args.json, "--json")
    plan.write(output, MODEL_OUTPUT, replaces=source if args.in_place else None, hint="; pass --in-place to allow it")
    plan.check()  # refused now, not after the calibration passes
    batches = NpzBatches(args.data)
    for file in batches.files:
        plan.read(file, "the --data file")
    plan.check()
    model = load_model(source)
    plan.check_reads(model.meta.get(SOURCE_FILES_META, ()))  # (in place, its data files are never written: files)
    console = Console(quiet=args.quiet, highlight=False, stderr=args.json == "-")  # stdout carries the JSON
    errors = Console(stderr=True)
    with Progress(
        TextColumn("recalibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=args.quiet or not errors.is_terminal,
    ) as progress:
        task = progress.add_task("recalibrate", total=None)

        def advance(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        model, report = recalibrate(
            model,
            batches,
            convention=args.convention or "onnx",
            match_torch=args.match_torch,
            progress=advance,
        )
    verification = None
    if args.fold:
        recalibrated = model.clone()
        model, fold_report = fold(model)
        console.print(f"folded {len(fold_report.folded)} / {len(fold_report.records)} BatchNormalization")
        verification = _verify(recalibrated, model, console)
    if verification is not None and not verification.passed:  # as `bnfold fold`: a failed fold writes nothing
        render_recalibration(console, report, "(not written)", verbose=args.verbose)
        if args.json:
            write_json(args.json, report.to_json())
        line = failure_line(verification, subject=args.model, nothing_written=True)
        fallback = f"bnfold: {args.model}: verification {verification.verdict.value}; nothing was written"
        print(line or fallback, file=sys.stderr)
        return ExitCode.FAILED
    with stage_model(model, output) as staged:
        staged.commit()
        kept = tuple(str(path) for path in staged.kept_data)  # in place: the old data files, never deleted
    render_recalibration(console, report, Path(output), verbose=args.verbose)
    kept_line = kept_data_line(kept, args.model)
    if kept_line is not None:
        console.print(kept_line, markup=False, highlight=False, soft_wrap=True)
    if args.json:
        write_json(args.json, report.to_json())
    return ExitCode.OK


def _verify(recalibrated: ir.Model, folded: ir.Model, console: Console) -> VerifyReport:
    """The folded model against the recalibrated one on CPU (optimisations off); prints the verdict."""
    from bnfold.validate.options import VerifyOptions, verify_with

    result = verify_with(recalibrated, folded, VerifyOptions(providers=("cpu",)))
    verdict = "passed" if result.passed else "FAILED"
    console.print(f"verify (folded against recalibrated, cpu): {verdict}")
    return result
