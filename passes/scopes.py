"""Where BatchNormalization nodes live: the main graph, If/Loop/Scan bodies, and model-local function bodies.

A :class:`Scope` is one graph plus a readable label (``main``, ``main/If_0.then_branch``,
``function:DOMAIN:NAME``) and the default-domain opset that governs BN semantics there (a function imports its
own opsets). This module also holds what every BN pass reports: :class:`FoldResult`, the fresh record of a BN,
and the BN-level checks shared by the fold and the standalone lowering.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import onnx
import onnx.defs
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import batch_norm_affine, check_inference_mode
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus
from bnfold.passes.rule import attribute_reference


@dataclasses.dataclass(frozen=True)
class Scope:
    graph: ir.Graph
    label: str
    opset: int
    # False in a function body whose default opset gives ``Constant`` another schema than the model's: a
    # Constant added there (folded tensors of a function are Constant nodes) fails the onnx checker.
    can_add_constants: bool = True


@dataclasses.dataclass
class FoldResult(ir.passes.PassResult):
    """``PassResult`` plus the per-BN :class:`~bnfold.report.FoldReport`."""

    report: FoldReport = dataclasses.field(default_factory=lambda: FoldReport((), 0, 0))


def iter_graphs(graph: ir.Graph, label: str = "main") -> Iterator[tuple[ir.Graph, str]]:
    """The graph and all its subgraphs, depth first, each with a readable path label."""
    yield graph, label
    for node in graph:
        attributes = node.attributes
        if not attributes:  # (most nodes: nothing to look at)
            continue
        for attribute in attributes.values():
            if attribute.is_ref():
                continue
            if attribute.type == ir.AttributeType.GRAPH:
                yield from iter_graphs(attribute.as_graph(), f"{label}/{node.name}.{attribute.name}")
            elif attribute.type == ir.AttributeType.GRAPHS:
                for i, subgraph in enumerate(attribute.as_graphs()):
                    yield from iter_graphs(subgraph, f"{label}/{node.name}.{attribute.name}[{i}]")


def model_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and its subgraphs, as ``model.graphs()`` lists them (which looks into every node).

    Functions' graphs are not included (like ``model.graphs()``).
    """
    return [graph for graph, _ in iter_graphs(model.graph)]


def default_opset(opset_imports: dict[str, int], fallback: int = 1) -> int:
    return opset_imports.get("", opset_imports.get("ai.onnx", fallback))


def function_label(function: ir.Function) -> str:
    """``function:DOMAIN:NAME`` (``:OVERLOAD`` appended when the function has one)."""
    label = f"function:{function.domain}:{function.name}"
    return f"{label}:{function.overload}" if function.overload else label


def function_scopes(function: ir.Function, model_opset: int) -> Iterator[Scope]:
    opset = default_opset(function.opset_imports, model_opset)
    can_add_constants = _constant_schema_version(opset) == _constant_schema_version(model_opset)
    for graph, label in iter_graphs(function.graph, function_label(function)):
        yield Scope(graph, label, opset, can_add_constants)


def _constant_schema_version(opset: int) -> int | None:
    try:
        return onnx.defs.get_schema("Constant", opset).since_version
    except onnx.defs.SchemaError:
        return None


def main_scopes(model: ir.Model) -> Iterator[Scope]:
    opset = default_opset(model.opset_imports)
    for graph, label in iter_graphs(model.graph):
        yield Scope(graph, label, opset)


def iter_scopes(model: ir.Model) -> Iterator[Scope]:
    """Main graph and subgraphs first, then every model-local function body (and its subgraphs)."""
    yield from main_scopes(model)
    model_opset = default_opset(model.opset_imports)
    for function in list(model.functions.values()):
        yield from function_scopes(function, model_opset)


def count_nodes(model: ir.Model, main: Iterable[Scope] | None = None) -> int:
    """Nodes of the main graph, its subgraphs and every function body.

    ``main``: the model's :func:`main_scopes`, when the caller has just listed them (saves a walk of the graph).
    """
    if main is None:
        return sum(len(scope.graph) for scope in iter_scopes(model))
    model_opset = default_opset(model.opset_imports)
    function_bodies = (
        scope for function in model.functions.values() for scope in function_scopes(function, model_opset)
    )
    return sum(len(scope.graph) for scope in main) + sum(len(scope.graph) for scope in function_bodies)


def new_record(
    node: ir.Node,
    scope: Scope,
    index: int,
    *,
    status: FoldStatus = FoldStatus.SKIPPED,
    reason: SkipReason | None = None,
    detail: str = "",
    output: str | None = None,
    neighbour: ir.Node | None = None,
    rule: str | None = None,
    affine: Affine | None = None,
    precision_cost: float | None = None,
) -> BatchNormRecord:
    """The record of BN ``node``, the ``index``-th node of its scope, built once.

    By default a 'skipped, no reason yet' record. ``output`` defaults to the BN's ``Y`` name; ``neighbour`` (the
    producer or forward consumer) fills ``producer``/``producer_node``; ``affine`` fills the scale range.
    """
    scale_min, scale_max = affine.scale_range() if affine is not None else (None, None)
    if output is None:
        output = node.outputs[0].name if node.outputs else ""
    return BatchNormRecord(
        node=node.name or f"<unnamed #{index}>",
        graph=scope.label,
        status=status,
        reason=reason,
        detail=detail,
        output=output,
        producer=neighbour.op_type if neighbour is not None else None,
        producer_node=neighbour.name if neighbour is not None else None,
        rule=rule,
        scale_min=scale_min,
        scale_max=scale_max,
        precision_cost=precision_cost,
    )


def inference_affine(node: ir.Node, opset: int, constants: ConstantResolver) -> Affine:
    """The BN's float64 affine, or ``Skip`` when the node is not an inference-mode BN with constant params."""
    reference = attribute_reference(node)
    if reference is not None:
        raise Skip(SkipReason.ATTRIBUTE_IS_REFERENCE, f"attribute {reference!r} refers to a function attribute")
    check_inference_mode(node, opset)
    return batch_norm_affine(node, constants)


def require_finite(affine: Affine) -> None:
    if not affine.is_finite():
        raise Skip(SkipReason.FOLDED_WEIGHTS_NOT_FINITE, "γ/√(var+ε) is not finite (var + ε <= 0?)")


def with_scale(record: BatchNormRecord, affine: Affine | None) -> BatchNormRecord:
    if affine is None:
        return record
    scale_min, scale_max = affine.scale_range()
    return dataclasses.replace(record, scale_min=scale_min, scale_max=scale_max)
