"""BatchNormalization node semantics the fold needs: inference mode, per-channel statistics, constant params.

Inference mode per opset (a node that may compute batch statistics is never folded):

=======  ====================================================================================
opset    training when
=======  ====================================================================================
1–6      ``is_test`` is 0 (its default in these opsets) or more than one output is present
7–13     more than one output is present (7 and 9: 1 output = inference, 5 = training)
14+      ``training_mode=1`` or more than one output is present (1 or 3 outputs)
=======  ====================================================================================

``spatial=0`` (opsets 1–8) normalises per activation, not per channel, and is never folded.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason

DEFAULT_EPSILON = 1e-5


def is_batch_norm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.as_int())


def check_inference_mode(node: ir.Node, opset: int) -> None:
    """Raise :class:`Skip` unless the node is an inference-mode, per-channel BatchNormalization."""
    present_outputs = sum(1 for output in node.outputs if output is not None and output.name)
    if opset >= 14 and _int_attribute(node, "training_mode", 0) != 0:
        raise Skip(SkipReason.TRAINING_MODE, "training_mode=1: normalises with batch statistics")
    if opset <= 6 and _int_attribute(node, "is_test", 0) == 0:
        raise Skip(SkipReason.TRAINING_MODE, f"opset {opset} with is_test=0 (the default): training mode")
    if present_outputs > 1:
        raise Skip(
            SkipReason.TRAINING_MODE,
            f"{present_outputs} outputs: opset {opset} computes running statistics (training mode)",
        )
    if opset <= 8 and _int_attribute(node, "spatial", 1) == 0:
        raise Skip(SkipReason.SPATIAL_ZERO, "spatial=0: per-activation statistics, not per channel")


def batch_norm_affine(node: ir.Node, constants: ConstantResolver) -> Affine:
    """The node's per-channel affine in float64, or :class:`Skip` when params are not constant 1-D [C]."""
    if len(node.inputs) < 5:
        raise Skip(SkipReason.PARAM_SHAPE_MISMATCH, f"expected 5 inputs, found {len(node.inputs)}")
    params = [constants.array(value) for value in node.inputs[1:5]]
    missing = [name for name, array in zip(("scale", "B", "mean", "var"), params, strict=True) if array is None]
    if missing:
        raise _params_skip(node, params, constants)
    shapes = [array.shape for array in params]
    if any(len(shape) != 1 for shape in shapes) or len(set(shapes)) != 1:
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH,
            "scale, B, mean, var must be 1-D of one length; got " + ", ".join(str(s) for s in shapes),
        )
    # kind "f": numpy floats; "V": ml_dtypes' bfloat16 and float8 (numpy sees them as opaque void types).
    if not all(array.dtype.kind in "fV" for array in params):
        raise Skip(SkipReason.UNSUPPORTED_DTYPE, "BN parameters are not floating point")
    epsilon_attribute = node.attributes.get("epsilon")
    # The attribute is a float32; widen exactly, and widen the default the same way a runtime sees it.
    epsilon = float(np.float32(DEFAULT_EPSILON)) if epsilon_attribute is None else epsilon_attribute.as_float()
    return Affine.from_batch_norm(*params, epsilon=epsilon)


def _params_skip(node: ir.Node, params: list[np.ndarray | None], constants: ConstantResolver) -> Skip:
    """``BN_PARAMS_ARE_GRAPH_INPUTS`` when every missing parameter is an overridable initializer input (naming
    them), else ``BN_PARAMS_NOT_CONSTANT``."""
    named = zip(("scale", "B", "mean", "var"), node.inputs[1:5], params, strict=True)
    missing = [(name, value) for name, value, array in named if array is None]
    if all(constants.is_overridable_input(value) for _, value in missing):
        inputs = ", ".join(f"{name} {value.name!r}" for name, value in missing)
        return Skip(
            SkipReason.BN_PARAMS_ARE_GRAPH_INPUTS,
            f"{inputs}: initializers also listed as graph inputs, overridable at run time"
            " (freeze them with --freeze-initializer-inputs)",
        )
    return Skip(SkipReason.BN_PARAMS_NOT_CONSTANT, f"{', '.join(name for name, _ in missing)} not constant")
