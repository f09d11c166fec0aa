"""Shrink a failing case while it keeps failing the same way (greedy delta debugging on the protobuf).

One pass tries, in order: dropping side files and symlinks, nodes (every graph), initializers, graph inputs,
outputs and value infos, attributes, functions, opset imports other than the default one, metadata and doc
strings. Every removal that keeps ``still_fails`` true is kept; passes repeat until none helps or the time
budget is spent. Cases whose bytes do not parse are returned unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError

from fuzz.mutate import graphs_of, nodes_of
from fuzz.seeds import Case


def _repeated_fields(model: onnx.ModelProto) -> Iterator[object]:
    """Repeated protobuf fields whose single entries may be removed, outermost first."""
    for graph in graphs_of(model):
        yield from (graph.node, graph.initializer, graph.input, graph.output, graph.value_info)
    for node in nodes_of(model):
        yield node.attribute
    yield model.functions
    for function in model.functions:
        yield function.node
    yield model.metadata_props


def _candidates(case: Case) -> Iterator[Case]:
    for index in range(len(case.files)):
        yield Case(case.model_bytes, case.files[:index] + case.files[index + 1 :], case.links)
    for index in range(len(case.links)):
        yield Case(case.model_bytes, case.files, case.links[:index] + case.links[index + 1 :])
    model = onnx.ModelProto.FromString(case.model_bytes)
    for field_number, field in enumerate(_repeated_fields(model)):
        for index in reversed(range(len(field))):
            trial = onnx.ModelProto.FromString(case.model_bytes)
            trial_field = list(_repeated_fields(trial))[field_number]
            del trial_field[index]
            yield Case(trial.SerializeToString(), case.files, case.links)
    for index, opset in enumerate(model.opset_import):
        if opset.domain not in ("", "ai.onnx"):
            trial = onnx.ModelProto.FromString(case.model_bytes)
            del trial.opset_import[index]
            yield Case(trial.SerializeToString(), case.files, case.links)
    if model.doc_string or model.producer_name or model.graph.doc_string:
        trial = onnx.ModelProto.FromString(case.model_bytes)
        trial.ClearField("doc_string")
        trial.ClearField("producer_name")
        trial.graph.ClearField("doc_string")
        yield Case(trial.SerializeToString(), case.files, case.links)


def minimise(case: Case, still_fails: Callable[[Case], bool], *, budget_seconds: float = 60.0) -> Case:
    """The smallest case found (by greedy removal) for which ``still_fails`` holds; ``case`` itself at worst."""
    try:
        onnx.ModelProto.FromString(case.model_bytes)
    except DecodeError:
        return case
    deadline = time.monotonic() + budget_seconds
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for candidate in _candidates(case):
            if time.monotonic() >= deadline:
                break
            if _size(candidate) >= _size(case):
                continue
            if still_fails(candidate):
                case, improved = candidate, True
                break
    return case


def _size(case: Case) -> int:
    return len(case.model_bytes) + sum(len(data) for _, data in case.files) + len(case.links)
