"""``bnfold lower-training MODEL -o OUT``: rewrite training-mode BatchNormalization into primitive ops."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bnfold.cli.output_paths import check_output_path
from bnfold.cli.render import render_lowering
from bnfold.errors import ExitCode
from bnfold.files import load_model, save_model
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
    source, output = Path(args.model), Path(args.output)
    check_output_path(source, output, "; choose another path")
    model = load_model(source)
    lowered, count = lower_training(model)
    save_model(lowered, output)
    render_lowering(Console(quiet=args.quiet, highlight=False), count, output)
    return ExitCode.OK
