"""``bnfold lower-training MODEL -o OUT``: rewrite training-mode BatchNormalization into primitive ops."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bnfold.cli.render import render_lowering
from bnfold.errors import ExitCode
from bnfold.files import SOURCE_FILES_META, load_model, save_model
from bnfold.files.output_plan import MODEL_OUTPUT, OutputPlan
from bnfold.training.lowering import lower_training

NAME = "lower-training"
HELP = (
    "rewrite training-mode BatchNormalization into bnfold's ONNX function (primitive ops in double) "
    "so that onnxruntime CPU and CUDA can run it"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX model with training-mode BatchNormalization")
    parser.add_argument("-o", "--output", required=True, help="where to write the lowered model")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")


def run(args: argparse.Namespace) -> int:
    source, output = Path(args.model), args.output
    plan = OutputPlan().read(source, "the input").write(output, MODEL_OUTPUT, hint="; choose another path")
    plan.check()
    model = load_model(source)
    plan.check_reads(model.meta.get(SOURCE_FILES_META, ()))  # its external data files
    lowered, count = lower_training(model)
    save_model(lowered, output)
    render_lowering(Console(quiet=args.quiet, highlight=False), count, Path(output))
    return ExitCode.OK
