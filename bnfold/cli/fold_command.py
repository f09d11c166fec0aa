"""``bnfold [fold] MODEL``: fold, write atomically, verify (unless --no-verify), summarise."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from bnfold import api, io
from bnfold.cli.render import render_fold_records, render_fold_summary
from bnfold.errors import ExitCode, UsageError
from bnfold.passes import rule_names

NAME = "fold"
HELP = "fold BatchNormalization into neighbouring layers (the default command: `bnfold MODEL`)"

try:  # validation is optional at import time so folding works even if onnxruntime is broken
    from bnfold.cli import verify_options
except ImportError:  # pragma: no cover - only without the validation package
    verify_options = None


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="the ONNX model to fold")
    parser.add_argument("-o", "--output", help="output path (default: <stem>.folded.onnx beside the input)")
    parser.add_argument("--in-place", action="store_true", help="replace the input file (atomically)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    parser.add_argument("--only", type=_comma_list, metavar="RULES", help="comma-separated rules to apply")
    parser.add_argument("--skip", type=_comma_list, metavar="RULES", help="comma-separated rules not to apply")
    parser.add_argument("--list-rules", action="store_true", help="print the rule names and exit")
    parser.add_argument("--no-verify", action="store_true", help="do not verify the folded model")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also list every BatchNormalization")
    if verify_options is not None:
        verify_options.add_verify_arguments(parser)


def default_output_path(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.folded.onnx")


def resolve_output(args: argparse.Namespace) -> Path:
    source = Path(args.model)
    if args.in_place:
        if args.output:
            raise UsageError("--in-place and --output are mutually exclusive")
        return source
    output = Path(args.output) if args.output else default_output_path(source)
    if output.exists() and source.exists() and os.path.samefile(output, source):
        raise UsageError(f"{output}: the output would overwrite the input (use --in-place to mean it)")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file path")
    return output


def run(args: argparse.Namespace) -> int:
    stdout_json = args.json == "-"
    console = Console(file=sys.stderr if stdout_json else sys.stdout, quiet=args.quiet)
    if args.list_rules:
        for name in rule_names():
            print(name)
        return ExitCode.OK
    if not args.model:
        raise UsageError("a MODEL path is required")
    output = resolve_output(args)
    started = time.perf_counter()
    model = io.load_model(args.model)
    size_before = io.files_size_bytes(args.model, model)
    # Decided before folding: the fold replaces external weights by in-memory ones.
    external_data = io.has_external_data(model) or None
    folded, report = api.fold(model, only=args.only, skip=args.skip)
    verification = None
    with io.stage_model(folded, output, external_data=external_data) as staged:
        if not args.no_verify and verify_options is not None:
            probes = {record.output: record.node for record in report.folded}
            verification = verify_options.verify_from_args(args, args.model, staged.path, probes=probes)
        passed = verification is None or verification.passed
        if passed:
            staged.commit()
        elif getattr(args, "keep_failed", False):
            io.save_model(folded, default_failed_path(output))
    seconds = time.perf_counter() - started
    size_after = io.files_size_bytes(output) if passed else None
    render_fold_summary(
        console,
        report,
        source=args.model,
        destination=str(output) if passed else None,
        size_before=size_before,
        size_after=size_after,
        seconds=seconds,
    )
    if args.verbose:
        render_fold_records(console, report)
    if verification is not None:
        verify_options.render_verify_report(console, verification)
    if args.json:
        document = {
            "input": str(args.model),
            "output": str(output) if passed else None,
            "size_before": size_before,
            "size_after": size_after,
            "seconds": round(seconds, 6),
            "fold": report.to_dict(),
            "verify": verification.to_dict() if verification is not None else None,
        }
        text = json.dumps(document, indent=2)
        if stdout_json:
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n")
    return ExitCode.OK if passed else ExitCode.FAILED


def default_failed_path(output: Path) -> Path:
    name = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{name}.failed.onnx")
