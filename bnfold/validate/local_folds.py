"""Each fold on its own: the layers around one probed tensor cut out of both models and fed the same inputs.

Why: deep in a badly conditioned network, the original float32 model is already ~1e-3 (relative) away from
its float64 evaluation at every intermediate tensor, so a fold whose bias is off by 1e-3 is invisible when
the whole network is compared. Cut out, a fold is a shallow computation: ``Conv'(x)`` in the candidate,
``BN(Conv(x))`` in the original, both fed the same ``x`` (the original's own float32 value of that tensor on
the verification's inputs). Their float32 rounding is ~1e-7 relative; a wrong fold is off by its own error,
whatever came before it.

:func:`fold_inputs` finds, for probed tensor ``P``, the non-constant inputs of the candidate node producing
``P``; :func:`sub_model` cuts the nodes computing ``P`` from those inputs out of a model (it returns ``None``
when ``P`` needs anything else, e.g. another graph input: then that fold is judged in the whole network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from bnfold.validate.model_source import ModelSource


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {tensor.name for tensor in graph.initializer}


def fold_inputs(candidate: ModelSource, tensor: str) -> tuple[str, ...] | None:
    """The non-initializer inputs of the candidate's main-graph node producing ``tensor`` (``None``: none)."""
    graph = candidate.proto.graph
    constants = _constants(graph)
    for node in graph.node:
        if tensor in node.output:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return None
            names = tuple(dict.fromkeys(name for name in node.input if name and name not in constants))
            return names or None
    return None


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
