"""Rewrite training-mode BatchNormalization into a call of bnfold's model-local training function.

onnxruntime's CUDA provider rejects ``training_mode=1`` and its CPU kernel accumulates in float32 (see
docs/training.md). This pass replaces each training-mode BN node with a call of
``bnfold.BatchNormalizationTraining`` (:mod:`bnfold.training.function`): primitive ops, computed in double,
that every provider runs. The function is added to ``model.functions`` (once), with its default-domain opset
set to the model's; ``bnfold`` is imported at version 1 and the IR version raised to 8 if lower (model-local
functions need IR 8).

Which nodes are rewritten (semantics from :mod:`bnfold.training.opsets`):

- BatchNormalization-14/15 with ``training_mode=1`` and 3 outputs (or just Y);
- BatchNormalization-7/9 with 5 outputs (running mean/var, saved mean, saved inverse std);
- BatchNormalization-1/6 with ``is_test=0`` need opset 6 or lower, where onnxruntime does not run models and
  numpy-style broadcasting does not exist: the pass raises :class:`~bnfold.errors.UsageError` (convert the
  model to opset 7+ first, or evaluate it with :func:`bnfold.training.evaluate_batch_norm_node`).

Each rewritten node becomes ``Constant(epsilon), Constant(momentum)`` (double scalars; the float32
attribute values widened exactly) and the call; ``spatial=0`` (BatchNormalization-7) adds ``Flatten(X)``
before and ``Reshape(Y, Shape(X))`` after. The call keeps the BN's name and outputs, so consumers and graph
outputs are untouched; new nodes and values are named ``<BN name>/<role>``, made unique in the model.
Inference-mode BN nodes are left alone; an invalid BN node raises :class:`~bnfold.errors.InvalidModelError`.
Nodes in the main graph and in every subgraph are rewritten; BN nodes inside model-local functions are not.

Types: the call's ``y_dtype``/``stats_dtype`` attributes need the dtypes of X and mean. When a value has no
type in the model, ONNX shape inference is run once; a dtype still unknown raises InvalidModelError.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from bnfold.errors import InvalidModelError, UsageError
from bnfold.passes.graph_edit import NameAllocator
from bnfold.training.names import (
    DOMAIN,
    DOMAIN_VERSION,
    MEAN_FUNCTION,
    MINIMUM_OPSET,
    TRAINING_FUNCTION,
)
from bnfold.training.opsets import DEFAULT_DOMAINS, OP_TYPE, BatchNormSemantics, node_semantics

# The lowest IR version with model-local functions.
FUNCTIONS_IR_VERSION = 8


@dataclasses.dataclass
class DecomposeResult(ir.passes.PassResult):
    """``PassResult`` plus the names of the rewritten BatchNormalization nodes, in graph order."""

    rewritten: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainingBatchNorm:
    """A training-mode BatchNormalization node found in a model, with its resolved semantics."""

    node: ir.Node
    semantics: BatchNormSemantics


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``""`` or ``"ai.onnx"``) opset; InvalidModelError when it has none."""
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    raise InvalidModelError("the model imports no default-domain (ai.onnx) opset")


def find_training_batch_norms(model: ir.Model) -> list[TrainingBatchNorm]:
    """Every training-mode BatchNormalization in the main graph and its subgraphs, in graph order.

    Raises InvalidModelError for a BN node whose attributes or outputs its opset does not define.
    """
    found = []
    opset = None
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != OP_TYPE or node.domain not in DEFAULT_DOMAINS:
            continue
        opset = default_opset(model) if opset is None else opset
        semantics = node_semantics(node, opset)
        if semantics.training:
            found.append(TrainingBatchNorm(node, semantics))
    return found


class DecomposeTrainingBatchNorm(ir.passes.InPlacePass):
    """Replace every training-mode BatchNormalization with a call of ``bnfold.BatchNormalizationTraining``.

    Returns a :class:`DecomposeResult` whose ``rewritten`` lists the replaced nodes' names.
    """

    def call(self, model: ir.Model) -> DecomposeResult:
        targets = find_training_batch_norms(model)
        if not targets:
            return DecomposeResult(model, modified=False)
        opset = default_opset(model)
        if opset < MINIMUM_OPSET:
            raise UsageError(
                f"training-mode BatchNormalization at opset {opset} cannot be lowered: the function needs "
                f"opset >= {MINIMUM_OPSET} (onnxruntime does not run older models either); convert the model "
                "with onnx.version_converter first"
            )
        if any(_dtype_of(value) is None for target in targets for value in _x_and_mean(target.node)):
            common_passes.ShapeInferencePass(strict_mode=False)(model)
        _add_functions(model, opset)
        names = NameAllocator(model)
        rewritten = []
        for target in targets:
            _rewrite(target, names)
            rewritten.append(target.node.name or "")
        return DecomposeResult(model, modified=True, rewritten=tuple(rewritten))


def _add_functions(model: ir.Model, opset: int) -> None:
    """Add BatchMean and the training function (default domain at ``opset``), import ``bnfold``."""
    imported = model.opset_imports.get(DOMAIN)
    if imported is not None and imported != DOMAIN_VERSION:
        raise InvalidModelError(f"the model imports domain {DOMAIN!r} at version {imported}, not {DOMAIN_VERSION}")
    from bnfold.training.function import training_functions  # onnxscript: imported only when needed

    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    if model.ir_version is None or model.ir_version < FUNCTIONS_IR_VERSION:
        model.ir_version = FUNCTIONS_IR_VERSION
    for proto in training_functions(opset):
        if proto.name not in (MEAN_FUNCTION, TRAINING_FUNCTION):
            continue
        function = ir.serde.deserialize_function(proto)
        key = function.identifier()
        existing = model.functions.get(key)
        if existing is not None:
            if ir.serde.serialize_function(existing).SerializeToString() != proto.SerializeToString():
                raise InvalidModelError(f"the model already defines {DOMAIN}.{proto.name} with another body")
            continue
        model.functions[key] = function


def _rewrite(target: TrainingBatchNorm, names: NameAllocator) -> None:
    node, semantics = target.node, target.semantics
    graph = node.graph
    label = node.name or "BatchNormalization"
    if len(node.inputs) != 5 or any(value is None for value in node.inputs):
        raise InvalidModelError(f"BatchNormalization node {label!r} needs 5 inputs (X, scale, B, mean, var)")
    x, scale, bias, mean, var = node.inputs
    y_dtype, stats_dtype = _required_dtype(x, label, "X"), _required_dtype(mean, label, "mean")

    def new_node(
        op_type: str,
        inputs: list,
        attributes: list,
        role: str,
        *,
        num_outputs: int = 1,
        domain: str = "",
        name: str | None = None,
        doc_string: str | None = None,
    ) -> ir.Node:
        """A node named ``name`` or ``<BN name>/<role>``; its outputs get fresh ``<BN name>/<role>`` names."""
        created = ir.Node(
            domain,
            op_type,
            inputs,
            attributes,
            num_outputs=num_outputs,
            name=name or names.fresh_node(f"{label}/{role}"),
            doc_string=doc_string,
        )
        for index, value in enumerate(created.outputs):
            value.name = names.fresh(f"{label}/{role}" if num_outputs == 1 else f"{label}/{role}_{index}")
        return created

    epsilon = new_node("Constant", [], [_double_tensor("epsilon", semantics.epsilon)], "epsilon")
    momentum = new_node("Constant", [], [_double_tensor("momentum", semantics.momentum)], "momentum")
    new_nodes = [epsilon, momentum]
    x_input = x
    if not semantics.spatial:
        flatten = new_node("Flatten", [x], [ir.AttrInt64("axis", 1)], "flatten")
        new_nodes.append(flatten)
        x_input = flatten.outputs[0]
    call = new_node(
        TRAINING_FUNCTION,
        [x_input, scale, bias, mean, var, epsilon.outputs[0], momentum.outputs[0]],
        [ir.AttrInt64("y_dtype", y_dtype.value), ir.AttrInt64("stats_dtype", stats_dtype.value)],
        "training",
        num_outputs=5,
        domain=DOMAIN,
        name=node.name or None,
        doc_string=node.doc_string,
    )
    new_nodes.append(call)
    results = list(call.outputs)
    if not semantics.spatial:
        x_shape = new_node("Shape", [x], [], "x_shape")
        unflatten = new_node("Reshape", [results[0], x_shape.outputs[0]], [], "unflatten")
        new_nodes += [x_shape, unflatten]
        results[0] = unflatten.outputs[0]
    old_values, new_values = [], []
    for old, new in zip(node.outputs, results, strict=False):
        if old.name:
            old_values.append(old)
            new_values.append(new)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, old_values, new_values)


def _x_and_mean(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    inputs = list(node.inputs) + [None] * 5
    return inputs[0], inputs[3]


def _double_tensor(name: str, number: float) -> ir.Attr:
    return ir.AttrTensor("value", ir.tensor(np.array(number, dtype=np.float64), name=name))


def _dtype_of(value: ir.Value | None) -> ir.DataType | None:
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    return None


def _required_dtype(value: ir.Value, node_name: str, role: str) -> ir.DataType:
    dtype = _dtype_of(value)
    if dtype is None:
        raise InvalidModelError(
            f"BatchNormalization node {node_name!r}: the dtype of {role} ({value.name!r}) is unknown even after "
            "shape inference; add value_info for it"
        )
    return dtype
