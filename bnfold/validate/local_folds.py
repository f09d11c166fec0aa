"""Each fold on its own: the layers around one probed tensor cut out of both models and fed the same inputs.

Why: deep in a badly conditioned network, the original float32 model is already ~1e-3 (relative) away from
its float64 evaluation at every intermediate tensor, so a fold whose bias is off by 1e-3 is invisible when
the whole network is compared. Cut out, a fold is a shallow computation: ``Conv'(x)`` in the candidate,
``BN(Conv(x))`` in the original, both fed the same ``x`` (the original's own float32 value of that tensor on
the verification's inputs). Their float32 rounding is ~1e-7 relative; a wrong fold is off by its own error,
whatever came before it.

:func:`fold_inputs` finds, for probed tensor ``P``, where the fold begins (the tensors both models compute
identically); :func:`sub_model` cuts the nodes computing ``P`` from those inputs out of a model (it returns ``None``
when ``P`` needs anything else, e.g. another graph input: then that fold is named in the report's note and
only the outputs decide).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from bnfold.validate.model_source import ModelSource


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {tensor.name for tensor in graph.initializer}


def shared_tensors(candidate: ModelSource, original: ModelSource, boundaries: Iterable[str]) -> set[str]:
    """The candidate's main-graph tensors that stand for the same values in the original: graph inputs, the
    fold ``boundaries`` (each fold's output keeps the BN's output name and, by the fold's contract, its
    values: each is checked by its own cut), and outputs of nodes identical in both models (same op, inputs,
    attributes and constant inputs) whose every input is itself shared. Graph order is topological, so one
    pass decides."""
    graph = candidate.proto.graph
    constants = {initializer.name: initializer for initializer in graph.initializer}
    original_graph = original.proto.graph
    original_constants = {initializer.name: initializer for initializer in original_graph.initializer}
    original_producers = {name: node for node in original_graph.node for name in node.output if name}
    original_inputs = {value.name for value in original_graph.input}
    shared = {value.name for value in graph.input if value.name in original_inputs} - set(constants)
    original_tensors = set(original_producers) | original_inputs
    shared.update(name for name in boundaries if name in original_tensors)
    for node in graph.node:
        first = next((name for name in node.output if name), None)
        inputs_shared = all(not name or name in constants or name in shared for name in node.input)
        if (
            first is not None
            and inputs_shared
            and _same_node(node, constants, original_producers.get(first), original_constants)
        ):
            shared.update(name for name in node.output if name)
    return shared


def fold_inputs(candidate: ModelSource, tensor: str, shared: set[str]) -> tuple[str, ...] | None:
    """Where the fold producing ``tensor`` in the candidate begins: walking back from ``tensor`` through the
    candidate, the first :func:`shared_tensors`. Every node in between was changed by the fold (a folded
    MatMul and its bias Add keep their output names, not their values; a forward fold changes everything
    from the removed BN to the absorbing layer). ``None``: nothing to cut (a subgraph on the way, or no
    shared tensor reached)."""
    graph = candidate.proto.graph
    constants = {initializer.name for initializer in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output if name}
    frontier: list[str] = []
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in constants:
            continue
        seen.add(name)
        if name in shared and name != tensor:
            frontier.append(name)
            continue
        node = producers.get(name)
        if node is None:  # a graph input the original does not have
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        stack.extend(node.input)
    return tuple(dict.fromkeys(frontier)) or None


def _same_node(
    node: onnx.NodeProto,
    constants: Mapping[str, onnx.TensorProto],
    other: onnx.NodeProto | None,
    other_constants: Mapping[str, onnx.TensorProto],
) -> bool:
    """The same computation in both models: op, inputs, outputs, attributes and every constant input."""
    if other is None or (node.op_type, node.domain) != (other.op_type, other.domain):
        return False
    if list(node.input) != list(other.input) or list(node.output) != list(other.output):
        return False
    if [a.SerializeToString() for a in node.attribute] != [a.SerializeToString() for a in other.attribute]:
        return False
    for name in node.input:
        if (name in constants) != (name in other_constants):
            return False
        if name in constants and constants[name].SerializeToString() != other_constants[name].SerializeToString():
            return False
    return True


def sub_model(
    source: ModelSource, inputs: Sequence[str], output: str, input_dtypes: Mapping[str, np.dtype]
) -> ModelSource | None:
    """The nodes of ``source``'s main graph computing ``output`` from ``inputs`` (and initializers), as a model.

    ``None`` when ``output`` depends on a graph input not among ``inputs``, on a subgraph, or when an input is
    not produced in this graph at all.
    """
    graph = source.proto.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    graph_inputs = {value.name for value in graph.input} - set(constants)
    wanted = set(inputs)
    if any(name not in producers and name not in graph_inputs for name in wanted):
        return None
    needed: set[int] = set()
    used_constants: set[str] = set()
    stack = [output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in wanted:
            continue
        seen.add(name)
        if name in constants:
            used_constants.add(name)
            continue
        index = producers.get(name)
        if index is None:  # a graph input that is not one of ``inputs``
            return None
        node = graph.node[index]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        needed.add(index)
        stack.extend(name for name in node.input if name)
    nodes = [graph.node[index] for index in sorted(needed)]
    typed_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[name])), None)
        for name in inputs
    ]
    cut = helper.make_graph(
        nodes,
        f"{graph.name or 'graph'}_fold",
        typed_inputs,
        [onnx.ValueInfoProto(name=output)],
        [constants[name] for name in sorted(used_constants)],
    )
    ir_version = max(source.proto.ir_version, 4)  # IR 3 would need every initializer listed as an input
    model = helper.make_model(cut, opset_imports=list(source.proto.opset_import), ir_version=ir_version)
    model.functions.extend(source.proto.functions)
    return dataclasses.replace(source, label=f"{source.label}[{output}]", proto=model)


def folds_between(
    original: ModelSource, inputs: Sequence[str], output: str, labels: Mapping[str, str]
) -> tuple[str, ...]:
    """The BatchNormalization nodes of ``original`` that compute ``output`` from ``inputs`` (the cut of
    :func:`fold_inputs`), in graph order: every fold that wrote the candidate's layers in between.

    Usually one (the fold whose output ``output`` is); more when, e.g., a forward fold (whose own output
    tensor no longer exists) and a backward fold wrote into the same weight: a divergence at ``output`` is
    then measured for all of them together. Each is named by ``labels[its output]`` when probed, else by its
    node name (``BatchNormalization #index`` when unnamed).
    """
    graph = original.proto.graph
    constants = _constants(graph)
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    wanted = set(inputs)
    found: set[int] = set()
    stack, seen = [output], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in wanted or name in constants:
            continue
        seen.add(name)
        index = producers.get(name)
        if index is None:
            continue
        node = graph.node[index]
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            found.add(index)
        stack.extend(node.input)
    names = []
    for index in sorted(found):
        node = graph.node[index]
        names.append(labels.get(node.output[0]) or node.name or f"BatchNormalization #{index}")
    return tuple(names)
