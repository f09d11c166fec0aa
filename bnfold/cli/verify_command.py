"""``bnfold verify ORIGINAL CANDIDATE``: compare two models with the same interface in onnxruntime."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from bnfold.cli.render import write_json
from bnfold.cli.verify_options import add_verify_arguments, render_verify_report, verify_exit_code, verify_from_args
from bnfold.validate.github_summary import append_step_summary, verify_markdown
from bnfold.validate.junit import JUnitSuite, verify_cases, write_junit_xml

NAME = "verify"
HELP = "compare a candidate model against its original in onnxruntime (CPU, CUDA) and report every output"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("original", help="the reference model (runs on onnxruntime CPU, optimisations off)")
    parser.add_argument("candidate", help="the model to check, e.g. the folded one")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    parser.add_argument("--junit-xml", metavar="PATH", help="write JUnit XML (one testcase per provider × output)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    add_verify_arguments(parser)


def run(args: argparse.Namespace) -> int:
    console = Console(file=sys.stderr if args.json == "-" else sys.stdout, quiet=args.quiet)
    report = verify_from_args(args, args.original, args.candidate)
    render_verify_report(console, report)
    if args.json:
        write_json(args.json, report.to_json())
    if args.junit_xml:
        write_junit_xml(args.junit_xml, [JUnitSuite("bnfold verify", verify_cases(report))])
    append_step_summary(verify_markdown(report))
    return verify_exit_code(report)
