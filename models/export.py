"""Export a torch model to ONNX with its BatchNormalization nodes preserved, with either torch exporter.

How each exporter of torch 2.13 treats BatchNormalization (checked by ``tests/models``):

- **TorchScript** (``torch.onnx.export(..., dynamo=False)``): in eval mode with ``do_constant_folding=True``
  (the default) its eval peephole fuses Conv+BN, so the file has no BN left. Exporting with
  ``training=TrainingMode.PRESERVE`` on a model already in eval mode skips that peephole and keeps every BN
  (inference-mode, ``training_mode=0`` from opset 14) while still constant-folding everything else; this is
  what we use. Supported opsets here: 9 to 21. Note: the exporter deduplicates initializers with equal values
  and then emits ``Identity`` nodes (e.g. an all-ones ``running_var`` aliasing ``γ``); realistic BN state
  makes that rare but a folder must still accept it.
- **Dynamo** (``dynamo=True``, the default in torch 2.13): its final step is onnxscript's optimizer, whose
  default rewrite rules fuse BN into Conv/Gemm. ``optimize=False`` keeps BN (and leaves the graph
  unoptimised: ``Constant``, ``CastLike``, ``Shape``/``Reshape`` chains stay; notably a bias-less Conv gets a
  bias computed at run time, ``Expand(CastLike(0, X), ...)``, so no BN after it counts as foldable).
  :func:`fold_exporter_constants` applies onnxscript's constant folding alone. It translates at opset 18 and
  below that falls back to 18 with a warning, so only opsets ≥ 18 are real here.

The dynamo exporter also records each node's Python stack trace in its metadata; :func:`strip_stack_traces`
removes those (absolute paths) so that files are byte-identical across checkouts.

fp16 variants are exported from ``model.half()`` (what users do), so every initializer including the BN
parameters is fp16.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn


class Exporter(str, enum.Enum):
    """The torch exporter that produced a file."""

    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


#: Opsets each exporter really emits with BN preserved (see the module docstring).
SUPPORTED_OPSETS: dict[Exporter, tuple[int, ...]] = {
    Exporter.TORCHSCRIPT: (9, 11, 13, 14, 15, 17, 18, 19, 20, 21),
    Exporter.DYNAMO: (18, 19, 20, 21, 22, 23),
}

BATCH_DIMENSION = "batch"


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation warnings and progress logging (they write to stderr/stdout)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_model(
    model: nn.Module,
    sample_inputs: tuple[torch.Tensor, ...],
    *,
    exporter: Exporter,
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    initializers_as_inputs: bool = False,
) -> ir.Model:
    """Export ``model`` (in eval mode) at ``opset`` with BN preserved and a symbolic batch dimension.

    ``initializers_as_inputs`` (TorchScript only) also lists every initializer as a graph input, as
    PyTorch < 1.3 and Caffe2-era exporters did.
    """
    if opset not in SUPPORTED_OPSETS[exporter]:
        raise ValueError(
            f"{exporter.value} exporter does not emit opset {opset} (supported: {SUPPORTED_OPSETS[exporter]})"
        )
    if initializers_as_inputs and exporter is not Exporter.TORCHSCRIPT:
        raise ValueError("initializers_as_inputs needs the torchscript exporter")
    if model.training:
        raise ValueError("export an eval-mode model: calibrate_batchnorm() leaves it in eval mode")
    with quiet_exporters(), torch.no_grad():
        if exporter is Exporter.TORCHSCRIPT:
            return _export_torchscript(model, sample_inputs, opset, input_names, output_names, initializers_as_inputs)
        exported = _export_dynamo(model, sample_inputs, opset, input_names, output_names)
    strip_stack_traces(exported)
    return exported


def _export_torchscript(
    model: nn.Module,
    sample_inputs: tuple[torch.Tensor, ...],
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    initializers_as_inputs: bool,
) -> ir.Model:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        sample_inputs,
        buffer,
        dynamo=False,
        opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes={name: {0: BATCH_DIMENSION} for name in (*input_names, *output_names)},
        keep_initializers_as_inputs=initializers_as_inputs,
    )
    return ir.from_proto(onnx.load_model_from_string(buffer.getvalue()))


def _export_dynamo(
    model: nn.Module,
    sample_inputs: tuple[torch.Tensor, ...],
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> ir.Model:
    batch = torch.export.Dim(BATCH_DIMENSION, min=1, max=1024)
    program = torch.onnx.export(
        model,
        sample_inputs,
        dynamo=True,
        optimize=False,
        verbose=False,
        opset_version=opset,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=tuple({0: batch} for _ in sample_inputs),
    )
    return program.model


#: Node metadata key under which the dynamo exporter stores the Python stack trace of each op.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model: ir.Model) -> None:
    """Drop the dynamo exporter's per-node stack traces: they hold absolute paths of this checkout and of
    site-packages, so keeping them would make the files differ between machines. Other metadata stays."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def fold_exporter_constants(model: ir.Model) -> None:
    """Constant-fold a raw dynamo export in place with onnxscript's folder, then drop unused nodes.

    The raw export computes each bias-less Conv's zero bias at run time
    (``Expand(CastLike(0, X), Expand(Shape(W), [1]))``), which no folder may treat as a constant. This is
    the constant-folding part of ``optimize=True``, without its rewrite rules (which fuse BN away).
    """
    onnxscript.optimizer.fold_constants(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
