"""The graph side of recalibration: which BatchNormalization nodes, in which order, and the models that expose
their inputs.

Targets: every inference-mode, per-channel BatchNormalization of the main graph whose ``mean`` and ``var`` are
constant 1-D ``[C]`` tensors (initializers, overridable initializer inputs included, or ``Constant`` nodes).
Everything else is skipped with a reason: training mode (it computes batch statistics itself), ``spatial=0``,
BNs inside subgraphs or functions, non-constant statistics, a constant or missing ``X``.

Generations (default, pooled mode): upstream BNs normalise with their running statistics, so a BN's input
changes when an upstream BN is recalibrated. ``generation(b) = 0`` when no target lies upstream of ``b``'s
``X``, else ``1 + max(generation of the targets upstream)``. A node with subgraphs is treated as depending on
every target before it (conservative). Recalibrating generation by generation, each with one pass over the
data, gives every BN the statistics of its input *as the recalibrated model computes it*.

Calibration models (built from a clone; the input model is not touched):

- pooled: each target's ``mean``/``var`` become fresh graph inputs, fed on every run, so one onnxruntime
  session serves all generations; each target's ``X`` becomes a graph output.
- match_torch: each target is switched to training mode (normalise with batch statistics, as a torch module
  in ``train()`` does) and lowered by :class:`~bnfold.training.decompose.DecomposeTrainingBatchNorm`
  into primitive ops that onnxruntime runs; ``X`` is exposed likewise. Running statistics play no part, so
  one pass suffices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.passes.batch_norm import check_inference_mode, is_batch_norm
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.graph_edit import NameAllocator
from bnfold.passes.reasons import Skip
from bnfold.training.decompose import DecomposeTrainingBatchNorm, default_opset

MEAN_INPUT, VAR_INPUT = 3, 4


@dataclasses.dataclass(frozen=True)
class Target:
    """A BatchNormalization to recalibrate: its position in the main graph and its current statistics."""

    position: int
    name: str
    mean: np.ndarray
    var: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A BatchNormalization left as it is, and why."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class CalibrationModel:
    """A model exposing the targets' inputs: ``x_outputs[i]`` is target ``i``'s X (an output, or a graph input
    when ``x_is_input[i]``); ``statistic_inputs[i]`` the names of the fed ``(mean, var)`` (pooled mode)."""

    model: ir.Model
    x_outputs: tuple[str, ...]
    x_is_input: tuple[bool, ...]
    statistic_inputs: tuple[tuple[str, str], ...] = ()


def find_targets(model: ir.Model) -> tuple[list[Target], list[Skipped]]:
    """Targets in graph order, and the BNs skipped (with a reason), main graph first then subgraphs."""
    opset = default_opset(model)
    constants = ConstantResolver(model)
    targets, skipped = [], []
    for position, node in enumerate(model.graph):
        if not is_batch_norm(node):
            continue
        label = node.name or f"BatchNormalization#{position}"
        reason = _skip_reason(node, opset)
        if reason is None:
            mean, var = (_constant_array(node.inputs[index], constants) for index in (MEAN_INPUT, VAR_INPUT))
            reason = _statistics_problem(mean, var)
        if reason is not None:
            skipped.append(Skipped(label, reason))
            continue
        targets.append(Target(position, label, mean, var))
    for graph in model.graphs():
        if graph is model.graph:
            continue
        skipped.extend(
            Skipped(node.name or "BatchNormalization", "inside a subgraph: only main-graph BNs are recalibrated")
            for node in graph
            if is_batch_norm(node)
        )
    for function in model.functions.values():
        skipped.extend(
            Skipped(node.name or "BatchNormalization", f"inside function {function.name}: not recalibrated")
            for node in function
            if is_batch_norm(node)
        )
    return targets, skipped


def _skip_reason(node: ir.Node, opset: int) -> str | None:
    try:
        check_inference_mode(node, opset)
    except Skip as skip:
        return f"{skip.reason.value}: {skip.detail}"
    if len(node.inputs) != 5 or any(value is None for value in node.inputs):
        return "needs 5 inputs (X, scale, B, mean, var)"
    x = node.inputs[0]
    if x.const_value is not None or (x.producer() is not None and x.producer().op_type == "Constant"):
        return "X is a constant: there is nothing to measure"
    return None


def _constant_array(value: ir.Value, constants: ConstantResolver) -> np.ndarray | None:
    if value.const_value is not None:  # an initializer, also one that is an overridable graph input
        return value.const_value.numpy()
    return constants.array(value)


def _statistics_problem(mean: np.ndarray | None, var: np.ndarray | None) -> str | None:
    if mean is None or var is None:
        return "mean or var is not a constant"
    if mean.ndim != 1 or mean.shape != var.shape:
        return f"mean and var must be 1-D of one length; got {mean.shape} and {var.shape}"
    if mean.dtype.kind not in "fV" or var.dtype.kind not in "fV":
        return f"mean/var are not floating point ({mean.dtype}, {var.dtype})"
    return None


def generations(model: ir.Model, targets: list[Target]) -> list[int]:
    """``generations(...)[i]`` is target ``i``'s generation (see module docstring)."""
    by_position = {target.position: index for index, target in enumerate(targets)}
    level: dict[ir.Value, int] = {}  # highest generation upstream of a value; absent: none
    result = [0] * len(targets)
    highest_so_far = -1
    for position, node in enumerate(model.graph):
        upstream = max((level.get(value, -1) for value in node.inputs if value is not None), default=-1)
        if _has_subgraph(node):
            upstream = max(upstream, highest_so_far)  # captured outer values are not tracked: assume all
        index = by_position.get(position)
        if index is not None:
            x_level = level.get(node.inputs[0], -1)
            result[index] = x_level + 1
            upstream = result[index]
        if upstream >= 0:
            for value in node.outputs:
                level[value] = upstream
            highest_so_far = max(highest_so_far, upstream)
    return result


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attribute in node.attributes.values()
    )


def pooled_model(model: ir.Model, targets: list[Target]) -> CalibrationModel:
    """A clone whose targets read ``mean``/``var`` from new graph inputs and whose targets' X are outputs."""
    clone = model.clone()
    names = NameAllocator(clone)
    nodes = list(clone.graph)
    statistic_inputs = []
    for target in targets:
        node = nodes[target.position]
        pair = []
        for index, role in ((MEAN_INPUT, "mean"), (VAR_INPUT, "var")):
            array = target.mean if role == "mean" else target.var
            fed = ir.Value(
                name=names.fresh(f"{target.name}/recalibrate_{role}"),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                shape=ir.Shape([target.channels]),
            )
            clone.graph.inputs.append(fed)
            node.replace_input_with(index, fed)
            pair.append(fed.name)
        statistic_inputs.append((pair[0], pair[1]))
    x_outputs, x_is_input = _expose(clone, [nodes[target.position].inputs[0] for target in targets])
    return CalibrationModel(clone, x_outputs, x_is_input, tuple(statistic_inputs))


def training_model(model: ir.Model, targets: list[Target]) -> CalibrationModel:
    """A clone whose targets normalise with batch statistics (lowered to primitive ops); X are outputs.

    X becomes an output after the lowering: its shape inference does not type graph outputs.
    """
    clone = model.clone()
    nodes = list(clone.graph)
    opset = default_opset(clone)
    target_nodes = [nodes[target.position] for target in targets]
    x_values = [node.inputs[0] for node in target_nodes]
    names = NameAllocator(clone)
    for node in target_nodes:
        _switch_to_training(clone.graph, node, opset, names)
    DecomposeTrainingBatchNorm()(clone)
    x_outputs, x_is_input = _expose(clone, x_values)
    return CalibrationModel(clone, x_outputs, x_is_input)


def _switch_to_training(graph: ir.Graph, node: ir.Node, opset: int, names: NameAllocator) -> None:
    """Replace ``node`` by its training-mode form with every output present (ONNX shape inference wants them):
    opset 14+ ``training_mode=1`` and 3 outputs, opsets 7–13 five outputs. Y keeps its value's consumers."""
    attributes = [attribute for key, attribute in node.attributes.items() if key in ("epsilon", "momentum")]
    if opset >= 14:
        attributes.append(ir.AttrInt64("training_mode", 1))
    replacement = ir.Node(
        node.domain,
        node.op_type,
        list(node.inputs),
        attributes,
        num_outputs=3 if opset >= 14 else 5,
        name=node.name,
        version=node.version,
    )
    for output in replacement.outputs[1:]:
        output.name = names.fresh(f"{node.name or 'BatchNormalization'}/training_output")
    old_y, new_y = node.outputs[0], replacement.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [old_y], [new_y])


def _expose(model: ir.Model, values: list[ir.Value]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Make every value a graph output (graph inputs are fed already); return names and which are inputs."""
    names, is_input = [], []
    for x in values:
        if x.is_graph_input():
            is_input.append(True)
        else:
            is_input.append(False)
            if x not in model.graph.outputs:
                model.graph.outputs.append(x)
        names.append(x.name)
    return tuple(names), tuple(is_input)


def write_statistics(
    model: ir.Model, node: ir.Node, target: Target, mean: np.ndarray, var: np.ndarray, names: NameAllocator
) -> None:
    """Make ``node`` (the target) read ``mean``/``var`` (in the old dtypes) without touching an existing tensor.

    Resolve every target's node before writing the first: removing a ``Constant`` node shifts positions.

    An initializer read by this input alone (and not a graph output) gets a new tensor; otherwise a new
    initializer with a fresh name is created and wired in, and a ``Constant`` node or initializer that no
    longer has a reader is removed.
    """
    for index, array in ((MEAN_INPUT, mean), (VAR_INPUT, var)):
        old = node.inputs[index]
        tensor = ir.Tensor(np.ascontiguousarray(array))
        if old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output():
            tensor.name = old.name
            old.const_value = tensor
            continue
        role = "mean" if index == MEAN_INPUT else "var"
        hint = f"{old.name}_recalibrated" if old.name else f"{target.name}/{role}_recalibrated"
        new = ir.Value(name=names.fresh(hint), const_value=tensor)
        tensor.name = new.name
        new.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        new.shape = ir.Shape(array.shape)
        model.graph.register_initializer(new)
        node.replace_input_with(index, new)
        _remove_if_orphaned(model.graph, old)


def _remove_if_orphaned(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name, None)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and not any(o.uses() for o in producer.outputs):
        graph.remove(producer, safe=True)
