"""BatchNormalization node semantics for every opset (1, 6, 7, 9, 14, 15), and a by-the-book node evaluator.

The schema in force is the newest BatchNormalization version not above the model's default-domain opset
(``onnx.defs.get_schema``): opsets 1–5 → 1, 6 → 6, 7–8 → 7, 9–13 → 9, 14 → 14, 15 and later → 15.

==========  ==============================  ======================================  ==========================
version     mode decided by                 outputs                                 attributes
==========  ==============================  ======================================  ==========================
1, 6        ``is_test`` (default 0 =        1 (Y) or 5; 5 only in training          epsilon, momentum,
            training)                                                               is_test, spatial
                                                                                    (1: consumed_inputs)
7, 9        the output count                1 = inference, 5 = training             epsilon, momentum
                                                                                    (7: spatial)
14, 15      ``training_mode`` (default 0)   0: exactly 1; 1: 3 (1 accepted, below)  epsilon, momentum,
                                                                                    training_mode
==========  ==============================  ======================================  ==========================

Training outputs, in order: ``Y, running_mean, running_var`` and, for versions 1–9, ``saved_mean,
saved_inv_std``. ONNX calls the fifth output "saved_var" without defining it; bnfold stores the inverse
standard deviation ``1/√(var + ε)`` there, as Caffe2 and onnxruntime do. An output slot named ``""`` is not
produced. Running statistics use the biased batch variance in every version (BatchNormalization-14 made
this explicit; the ONNX reference implementation and onnxruntime do the same for the older versions).

Decisions where ONNX is silent or stricter than needed (documented in docs/training.md):

- ``training_mode=1`` with a single output: ONNX shape inference demands 3 outputs; bnfold evaluates it
  (Y from batch statistics, running statistics simply not produced) so such models can be lowered and run.
- ``spatial=0`` (versions 1, 6, 7) normalises per activation: ``X`` is flattened to ``(N, C·D1·…·Dk)`` and
  the parameters must hold ``C·D1·…·Dk`` values (any shape); outputs keep the parameters' shape.
- ``consumed_inputs`` (version 1) is a legacy in-place hint and is ignored.
- Attribute values for ``is_test``, ``spatial`` and ``training_mode`` must be 0 or 1.

Types: versions 1–9 need one dtype T ∈ {float16, float, double} for all inputs; version 14 has T (X, scale,
B) and U (mean, var) from {float16, float, double, bfloat16}; version 15 has T (X), T1 (scale, B) and
T2 (mean, var). Y has X's dtype; running and saved statistics have mean's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, UsageError
from bnfold.training.reference import batch_norm_forward

OP_TYPE = "BatchNormalization"
DEFAULT_DOMAINS = ("", "ai.onnx")

# Attribute defaults as a runtime reads them: float32 values widened exactly.
DEFAULT_EPSILON = float(np.float32(1e-5))
DEFAULT_MOMENTUM = float(np.float32(0.9))

_ALLOWED_ATTRIBUTES: dict[int, frozenset[str]] = {
    1: frozenset({"consumed_inputs", "epsilon", "momentum", "is_test", "spatial"}),
    6: frozenset({"epsilon", "momentum", "is_test", "spatial"}),
    7: frozenset({"epsilon", "momentum", "spatial"}),
    9: frozenset({"epsilon", "momentum"}),
    14: frozenset({"epsilon", "momentum", "training_mode"}),
    15: frozenset({"epsilon", "momentum", "training_mode"}),
}

_OLD_TYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
_NEW_TYPES = _OLD_TYPES | {np.dtype(ir.DataType.BFLOAT16.numpy())}

# Which inputs share one type parameter, per version (indices into X, scale, B, mean, var).
_TYPE_GROUPS: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {
    1: (("T", (0, 1, 2, 3, 4)),),
    6: (("T", (0, 1, 2, 3, 4)),),
    7: (("T", (0, 1, 2, 3, 4)),),
    9: (("T", (0, 1, 2, 3, 4)),),
    14: (("T", (0, 1, 2)), ("U", (3, 4))),
    15: (("T", (0,)), ("T1", (1, 2)), ("T2", (3, 4))),
}

INPUT_NAMES = ("X", "scale", "B", "mean", "var")
TRAINING_OUTPUT_NAMES = ("Y", "running_mean", "running_var", "saved_mean", "saved_inv_std")


@dataclass(frozen=True)
class BatchNormSemantics:
    """What one BatchNormalization node computes, resolved from its opset, attributes and outputs.

    ``outputs_present[i]`` says whether output slot ``i`` (see :data:`TRAINING_OUTPUT_NAMES`) is produced.
    """

    opset: int
    version: int
    training: bool
    epsilon: float
    momentum: float
    spatial: bool
    outputs_present: tuple[bool, ...]

    @property
    def output_count(self) -> int:
        """Number of output slots, empty ones included."""
        return len(self.outputs_present)


def schema_version(opset: int) -> int:
    """The BatchNormalization version in force at default-domain ``opset`` (1, 6, 7, 9, 14 or 15)."""
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or opset < 1:
        raise UsageError(f"opset must be a positive int, got {opset!r}")
    try:
        return int(onnx.defs.get_schema(OP_TYPE, int(opset)).since_version)
    except (onnx.defs.SchemaError, TypeError) as error:  # TypeError: a version beyond a C int
        raise UsageError(f"onnx {onnx.__version__} knows no BatchNormalization at opset {opset}") from error


def resolve_semantics(
    attributes: Mapping[str, object], output_names: Sequence[str], opset: int, *, node_name: str = ""
) -> BatchNormSemantics:
    """Resolve a node's semantics; raise :class:`InvalidModelError` for combinations ONNX does not define.

    Args:
        attributes: attribute name → Python value (int, float, list of int).
        output_names: the node's output names, ``""`` for an omitted slot.
        opset: the model's default-domain opset.
    """
    version = schema_version(opset)
    where = f"BatchNormalization-{version} node {node_name!r}" if node_name else f"BatchNormalization-{version}"
    unknown = sorted(set(attributes) - _ALLOWED_ATTRIBUTES[version])
    if unknown:
        raise InvalidModelError(f"{where}: attribute(s) {', '.join(unknown)} not defined at this version")
    epsilon = _float_attribute(attributes, "epsilon", DEFAULT_EPSILON, where)
    momentum = _float_attribute(attributes, "momentum", DEFAULT_MOMENTUM, where)
    spatial = _flag_attribute(attributes, "spatial", 1, where) == 1
    count = len(output_names)
    if version >= 14:
        training = _flag_attribute(attributes, "training_mode", 0, where) == 1
        allowed_counts = (1, 3) if training else (1,)
        reason = "training_mode=1 takes Y, running_mean, running_var" if training else "training_mode=0 takes Y"
    elif version >= 7:
        training = count == 5
        allowed_counts = (1, 5)
        reason = "1 output means inference, 5 outputs mean training"
    else:
        training = _flag_attribute(attributes, "is_test", 0, where) == 0
        allowed_counts = (1, 5) if training else (1,)
        reason = "is_test=0 (training) takes 1 or 5 outputs" if training else "is_test=1 takes only Y"
    if count not in allowed_counts:
        raise InvalidModelError(f"{where}: {count} outputs; {reason}")
    if not output_names[0]:
        raise InvalidModelError(f"{where}: output Y must be named")
    return BatchNormSemantics(
        opset=int(opset),
        version=version,
        training=training,
        epsilon=epsilon,
        momentum=momentum,
        spatial=spatial,
        outputs_present=tuple(bool(name) for name in output_names),
    )


def node_semantics(node: onnx.NodeProto | ir.Node, opset: int | None = None) -> BatchNormSemantics:
    """:func:`resolve_semantics` for an ``onnx.NodeProto`` or ``onnx_ir.Node``.

    ``opset`` defaults to the ``ir.Node``'s ``version`` or its graph's default-domain opset import.
    """
    if isinstance(node, onnx.NodeProto):
        op_type, domain, name = node.op_type, node.domain, node.name
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        output_names = list(node.output)
    elif isinstance(node, ir.Node):
        op_type, domain, name = node.op_type, node.domain, node.name or ""
        attributes = {}
        for key, attribute in node.attributes.items():
            if attribute.is_ref():
                raise UsageError(f"node {name!r}: attribute {key!r} refers to a function attribute; bind it first")
            attributes[key] = attribute.value
        output_names = [value.name or "" if value is not None else "" for value in node.outputs]
        opset = opset if opset is not None else _ir_node_opset(node)
    else:
        raise UsageError(f"expected an onnx.NodeProto or onnx_ir.Node, got {type(node).__name__}")
    if op_type != OP_TYPE or domain not in DEFAULT_DOMAINS:
        raise UsageError(f"node {name!r} is {domain or 'ai.onnx'}::{op_type}, not BatchNormalization")
    if opset is None:
        raise UsageError(f"node {name!r}: pass opset= (the model's default-domain opset)")
    return resolve_semantics(attributes, output_names, opset, node_name=name)


def evaluate_batch_norm_node(
    node: onnx.NodeProto | ir.Node, inputs: Sequence[np.ndarray], *, opset: int | None = None
) -> tuple[np.ndarray | None, ...]:
    """Run one BatchNormalization node by the book; one array per output slot (``None`` for ``""`` slots).

    ``inputs`` are ``X, scale, B, mean, var``. Raises :class:`InvalidModelError` when the node, or the inputs'
    dtypes and shapes, are not valid for its version.
    """
    semantics = node_semantics(node, opset)
    return evaluate(semantics, inputs)


def evaluate(semantics: BatchNormSemantics, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray | None, ...]:
    """Evaluate resolved ``semantics`` on ``X, scale, B, mean, var`` (see :func:`evaluate_batch_norm_node`)."""
    if len(inputs) != 5:
        raise InvalidModelError(f"BatchNormalization takes 5 inputs (X, scale, B, mean, var), got {len(inputs)}")
    arrays = [np.asarray(array) for array in inputs]
    _check_types(semantics.version, arrays)
    x, scale, bias, mean, var = arrays
    if x.ndim == 0:
        raise InvalidModelError("BatchNormalization input X must have at least 1 dimension")
    parameter_shape = mean.shape
    if semantics.spatial or x.ndim <= 2:
        channels = 1 if x.ndim == 1 else x.shape[1]
        x_for_reference = x
    else:
        channels = math.prod(x.shape[1:])
        x_for_reference = x.reshape(x.shape[0], channels)
    parameters = [
        _flat_parameter(array, name, channels, semantics.spatial)
        for array, name in zip((scale, bias, mean, var), INPUT_NAMES[1:], strict=True)
    ]
    try:
        outputs = batch_norm_forward(
            x_for_reference,
            *parameters,
            epsilon=semantics.epsilon,
            momentum=semantics.momentum,
            training=semantics.training,
            convention="onnx",
        )
    except UsageError as error:
        raise InvalidModelError(f"BatchNormalization-{semantics.version}: {error}") from error
    y = outputs.y.reshape(x.shape)
    statistics = [
        array.astype(mean.dtype).reshape(parameter_shape)
        for array in (outputs.running_mean, outputs.running_var, outputs.saved_mean, outputs.saved_inv_std)
    ]
    values = (y, *statistics)[: semantics.output_count]
    return tuple(value if present else None for value, present in zip(values, semantics.outputs_present, strict=True))


def _flat_parameter(array: np.ndarray, name: str, channels: int, spatial: bool) -> np.ndarray:
    if spatial:
        if array.shape != (channels,):
            raise InvalidModelError(f"BatchNormalization input {name} must have shape ({channels},), got {array.shape}")
        return array
    if array.size != channels:
        raise InvalidModelError(
            f"BatchNormalization input {name} with spatial=0 must hold {channels} values (C·D1·…·Dk), "
            f"got shape {array.shape}"
        )
    return array.reshape(channels)


def _check_types(version: int, arrays: Sequence[np.ndarray]) -> None:
    allowed = _NEW_TYPES if version >= 14 else _OLD_TYPES
    for type_name, indices in _TYPE_GROUPS[version]:
        dtypes = {arrays[index].dtype for index in indices}
        names = ", ".join(INPUT_NAMES[index] for index in indices)
        if len(dtypes) != 1:
            found = ", ".join(f"{INPUT_NAMES[i]}={arrays[i].dtype}" for i in indices)
            raise InvalidModelError(f"BatchNormalization-{version}: {names} share type {type_name}; got {found}")
        (dtype,) = dtypes
        if dtype not in allowed:
            permitted = ", ".join(sorted(str(d) for d in allowed))
            raise InvalidModelError(
                f"BatchNormalization-{version}: type {type_name} ({names}) must be one of {permitted}; got {dtype}"
            )


def _float_attribute(attributes: Mapping[str, object], name: str, default: float, where: str) -> float:
    value = attributes.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (float, int, np.floating, np.integer)):
        raise InvalidModelError(f"{where}: attribute {name} must be a float, got {value!r}")
    return float(value)


def _flag_attribute(attributes: Mapping[str, object], name: str, default: int, where: str) -> int:
    value = attributes.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (0, 1):
        raise InvalidModelError(f"{where}: attribute {name} must be 0 or 1, got {value!r}")
    return int(value)


def _ir_node_opset(node: ir.Node) -> int | None:
    """The node's own ``version``, else its graph's default-domain import (subgraphs usually have none)."""
    if node.version is not None:
        return node.version
    if node.graph is None:
        return None
    opset_imports = node.graph.opset_imports
    return next((opset_imports[domain] for domain in DEFAULT_DOMAINS if domain in opset_imports), None)
