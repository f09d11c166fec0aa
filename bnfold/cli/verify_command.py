"""``bnfold verify ORIGINAL CANDIDATE``: compare two models with the same interface in onnxruntime.

Exit codes: 0 passed (or a provider only skipped), 1 verification failed or timed out (``--timeout``),
2 usage error, 3 unreadable model, 4 a provider required with ``--require-provider`` is unavailable,
5 no onnxruntime installed, 6 an output (``--json``, ``--junit-xml``) could not be written.
A failure always ends with one line on stderr saying what failed, even with ``-q``.
"""

from __future__ import annotations

import argparse
import sys

from bnfold.cli.render import make_console, render_failure_line, write_json
from bnfold.cli.verify_options import (
    VerifyProgress,
    add_verify_arguments,
    render_verify_report,
    verify_exit_code,
    verify_from_args,
)
from bnfold.files.output_plan import OutputPlan
from bnfold.runtime import require_onnxruntime
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
    require_onnxruntime("bnfold verify")  # exit 5 with one line when no onnxruntime is installed
    plan = OutputPlan().read_model(args.original).read_model(args.candidate)
    plan.read(args.load_inputs, "the --load-inputs file").write(args.json, "--json")
    plan.write(args.junit_xml, "--junit-xml").write(args.save_inputs, "--save-inputs").check()  # before any work
    console = make_console(file=sys.stderr if args.json == "-" else sys.stdout, quiet=args.quiet)
    errors = make_console(stderr=True)
    with VerifyProgress(make_console(stderr=True, quiet=args.quiet)) as progress:
        report = verify_from_args(args, args.original, args.candidate, progress=progress)
    render_verify_report(console, report)
    if args.json:
        write_json(args.json, report.to_json())
    if args.junit_xml:
        write_junit_xml(args.junit_xml, [JUnitSuite("bnfold verify", verify_cases(report))])
    append_step_summary(verify_markdown(report))
    render_failure_line(errors, report, subject=f"{args.candidate} against {args.original}", nothing_written=False)
    return verify_exit_code(report)
