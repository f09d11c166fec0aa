"""``bnfold recalibrate MODEL --data PATH -o OUT``: re-estimate BN running statistics from data, optionally fold."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bnfold import io
from bnfold.cli.output_paths import check_json_path, check_not_read, check_output_path
from bnfold.errors import ExitCode, UsageError

if TYPE_CHECKING:  # the API imports onnxruntime: keep `bnfold --help` light
    import onnx_ir as ir

    from bnfold.recalibration import RecalibrationReport

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


def _output_path(args: argparse.Namespace, source: Path) -> Path:
    if args.in_place:
        if args.output is not None and Path(args.output).resolve() != source.resolve():
            raise UsageError("give either -o/--output or --in-place, not both")
        return source
    if args.output is None:
        raise UsageError("give -o/--output OUT (or --in-place to overwrite the model)")
    output = Path(args.output)
    check_output_path(source, output, "; pass --in-place to allow it")
    if not output.parent.is_dir():  # refused now, not after the calibration passes
        raise UsageError(f"{output}: output directory {output.parent} does not exist")
    return output


def run(args: argparse.Namespace) -> int:
    from bnfold.api import fold
    from bnfold.recalibration import NpzBatches, recalibrate

    if args.match_torch and args.convention == "onnx":
        raise UsageError("--match-torch stores torch's unbiased variance; it cannot be combined with --convention onnx")
    source = Path(args.model)
    output = _output_path(args, source)
    check_json_path(args.json)
    batches = NpzBatches(args.data)
    check_not_read(output, batches.files, "the --data file")
    model = io.load_model(source)
    if not args.in_place:  # in place, the model file is replaced on purpose; its data files never are (io)
        check_not_read(output, model.meta.get(io.SOURCE_FILES_META, ()), "a file the model is read from:")
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
    _render(console, report, output, args.verbose)
    exit_code = ExitCode.OK
    if args.fold:
        recalibrated = model.clone()
        model, fold_report = fold(model)
        console.print(f"folded {len(fold_report.folded)} / {len(fold_report.records)} BatchNormalization")
        exit_code = _verify(recalibrated, model, console)
    with io.stage_model(model, output) as staged:
        staged.commit()
        if args.in_place:  # the input's previous data file is no longer read by anything (as `fold --in-place`)
            staged.remove_superseded_data()
    if args.json:
        text = report.to_json()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return exit_code


def _verify(recalibrated: ir.Model, folded: ir.Model, console: Console) -> int:
    from bnfold.validate import verify

    result = verify(recalibrated, folded, providers=("cpu",))
    verdict = "passed" if result.passed else "FAILED"
    console.print(f"verify (folded against recalibrated, cpu): {verdict}")
    return ExitCode.OK if result.passed else ExitCode.FAILED


def _render(console: Console, report: RecalibrationReport, output: Path, verbose: bool) -> None:
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
