"""Fold BatchNormalization inside model-local functions, per call site when weights arrive as call arguments.

A function body holds no initializers: its weights are ``Constant`` nodes, and the driver folds them like in
any graph (records labelled ``function:DOMAIN:NAME``; new tensors become ``Constant`` nodes). A BN whose
weight, bias or parameters are function *inputs* (or whose attributes refer to function attributes) can only
fold once those values are known, which is per call site.

**Choice: specialise, not inline.** For each call of such a function from the main graph or one of its
subgraphs that passes at least one constant argument (or the function uses attribute references):

1. the function is cloned as ``NAME_bnfold_K`` in the same domain;
2. in the clone, every constant argument becomes a ``Constant`` node and is dropped from the clone's inputs;
   attribute references are resolved from the call's attributes (or the function's defaults);
3. the clone is folded; only if at least one BN folds is it added to the model and the call redirected to it
   (the bound arguments are dropped from the call); otherwise the clone is discarded and the call is kept;
4. a function that no node calls any more after this is removed, with its records.

This keeps the function boundary and every other call site as they are and copies only what gains a fold;
nothing is inlined. Limits: calls made from inside other function bodies are not specialised, and each call
site gets its own clone (identical calls are not deduplicated).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from bnfold.passes.constants import ConstantResolver
from bnfold.passes.graph_edit import TensorWriter
from bnfold.passes.reasons import SkipReason
from bnfold.passes.records import BatchNormRecord
from bnfold.passes.scopes import default_opset, function_label, iter_graphs

if TYPE_CHECKING:
    from bnfold.passes.fold_batch_norm import FoldBatchNormPass

# Skips that binding call arguments or call attributes can lift.
CALL_SITE_REASONS = frozenset(
    {
        SkipReason.WEIGHT_NOT_CONSTANT,
        SkipReason.BIAS_NOT_CONSTANT,
        SkipReason.BN_PARAMS_NOT_CONSTANT,
        SkipReason.ATTRIBUTE_IS_REFERENCE,
    }
)


def fold_functions(
    model: ir.Model, fold_pass: FoldBatchNormPass, constants: ConstantResolver, writer: TensorWriter
) -> list[BatchNormRecord]:
    """Fold every function body, then specialise call sites where that lifts a skip; return the records."""
    if not model.functions:
        return []  # (finding call sites walks every graph)
    model_opset = default_opset(model.opset_imports)
    callers = _call_sites(model)
    records: list[BatchNormRecord] = []
    specialised: set[ir.OperatorIdentifier] = set()
    for function_id, function in list(model.functions.items()):
        body_records = fold_pass.fold_function(function, model_opset)
        records.extend(body_records)
        if not fold_pass.specialise_functions or not any(r.reason in CALL_SITE_REASONS for r in body_records):
            continue
        for call in callers.get(function_id, ()):
            clone_records = _specialise_call(model, function, call, fold_pass, constants, writer)
            if clone_records:
                records.extend(clone_records)
                specialised.add(function_id)
    removed_labels = _remove_uncalled(model, specialised)
    return [r for r in records if r.graph.split("/", 1)[0] not in removed_labels]


def _call_sites(model: ir.Model) -> dict[ir.OperatorIdentifier, list[ir.Node]]:
    calls: dict[ir.OperatorIdentifier, list[ir.Node]] = {}
    for graph, _ in iter_graphs(model.graph):
        for node in graph:
            if node.op_identifier() in model.functions:
                calls.setdefault(node.op_identifier(), []).append(node)
    return calls


def _specialise_call(
    model: ir.Model,
    function: ir.Function,
    call: ir.Node,
    fold_pass: FoldBatchNormPass,
    constants: ConstantResolver,
    writer: TensorWriter,
) -> list[BatchNormRecord]:
    """Fold a clone of ``function`` bound to ``call``'s constants; commit it only when something folds."""
    bound = {
        index: array
        for index, argument in enumerate(call.inputs[: len(function.inputs)])
        if argument is not None and (array := constants.array(argument)) is not None
    }
    uses_references = any(attr.is_ref() for node in function.all_nodes() for attr in node.attributes.values())
    if not bound and not uses_references:
        return []
    clone = function.clone()
    clone.name = _fresh_function_name(model, function)
    _bind_arguments(clone, bound, writer)
    _resolve_attribute_references(clone, call, function)
    writer.register_function(clone)
    clone_records = fold_pass.fold_function(clone, default_opset(model.opset_imports))
    if not any(record.folded for record in clone_records):
        return []
    model.functions[clone.identifier()] = clone
    writer.maybe_orphaned.extend(call.inputs[index] for index in bound)
    remaining = [value for index, value in enumerate(call.inputs) if index not in bound]
    for index, value in enumerate(remaining):
        call.replace_input_with(index, value)
    call.resize_inputs(len(remaining))
    call.op_type = clone.name
    suffix = f" (function specialised for call {call.name!r} of {function_label(function)})"
    return [dataclasses.replace(record, detail=record.detail + suffix) for record in clone_records]


def _fresh_function_name(model: ir.Model, function: ir.Function) -> str:
    taken = {(domain, name) for domain, name, _ in model.functions}
    index = 1
    while (function.domain, f"{function.name}_bnfold_{index}") in taken:
        index += 1
    return f"{function.name}_bnfold_{index}"


def _bind_arguments(clone: ir.Function, bound: dict[int, np.ndarray], writer: TensorWriter) -> None:
    """Turn the clone's inputs at ``bound`` positions into ``Constant`` nodes holding the call's values."""
    first = clone[0] if len(clone) else None
    for index in sorted(bound, reverse=True):
        formal = clone.inputs[index]
        array = bound[index]
        constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
        constant.name = writer.names.fresh_node(f"{formal.name}_bound")
        output = constant.outputs[0]
        output.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        output.shape = ir.Shape(array.shape)
        if first is None:
            clone.append(constant)
        else:
            clone.insert_before(first, constant)
        formal.replace_all_uses_with(output, replace_graph_outputs=True)
        clone.inputs.pop(index)
        output.name = formal.name


def _resolve_attribute_references(clone: ir.Function, call: ir.Node, function: ir.Function) -> None:
    """Replace every ``@name`` attribute in the clone by the call's value (or the function's default)."""
    for node in clone.all_nodes():
        for name, attribute in list(node.attributes.items()):
            if not attribute.is_ref():
                continue
            source = call.attributes.get(attribute.ref_attr_name) or function.attributes.get(attribute.ref_attr_name)
            if source is None or source.value is None:
                del node.attributes[name]  # not given and no default: the attribute is unset
            else:
                node.attributes[name] = ir.Attr(name, source.type, source.value)


def _remove_uncalled(model: ir.Model, candidates: set[ir.OperatorIdentifier]) -> set[str]:
    """Remove the candidate functions nothing calls any more; return their record labels."""
    called = {node.op_identifier() for node in model.graph.all_nodes()}
    for function in model.functions.values():
        called.update(node.op_identifier() for node in function.all_nodes())
    removed = set()
    for function_id in candidates - called:
        removed.add(function_label(model.functions.pop(function_id)))
    return removed
