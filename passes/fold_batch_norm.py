"""The driver: one loop over every BatchNormalization, shared preconditions, then the producer's rule.

For each BN node (main graph and every If/Loop/Scan body, in graph order):

1. inference mode and per-channel statistics (:func:`~bnfold.passes.batch_norm.check_inference_mode`);
2. constant 1-D parameters → float64 :class:`~bnfold.passes.affine.Affine`, finite;
3. a producer whose op has an enabled rule, whose output feeds only this BN and is not a graph output;
4. the rule's :class:`~bnfold.passes.rule.FoldPlan`, every tensor cast once with range checks;
5. only then the graph changes: tensors written, BN bypassed, orphans pruned.

Any failed step records a named :class:`~bnfold.passes.reasons.SkipReason` and leaves the BN untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import onnx_ir as ir
from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import batch_norm_affine, check_inference_mode, is_batch_norm
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.conv import ConvRule
from bnfold.passes.conv_transpose import ConvTransposeRule
from bnfold.passes.graph_edit import NameAllocator, TensorWriter, bypass_batch_norm
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus
from bnfold.passes.rule import FoldRule, cast_checked

DEFAULT_RULES: tuple[FoldRule, ...] = (ConvRule(), ConvTransposeRule())


def rule_names(rules: Sequence[FoldRule] = DEFAULT_RULES) -> tuple[str, ...]:
    return tuple(rule.name for rule in rules)


def select_rules(
    rules: Sequence[FoldRule], only: Iterable[str] | None = None, skip: Iterable[str] | None = None
) -> tuple[FoldRule, ...]:
    """The rules enabled by ``only``/``skip``; unknown names raise ``ValueError`` naming the known ones."""
    known = rule_names(rules)
    requested = set(only or ()) | set(skip or ())
    unknown = sorted(requested - set(known))
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; known rules: {', '.join(known)}")
    enabled = set(only) if only is not None else set(known)
    enabled -= set(skip or ())
    return tuple(rule for rule in rules if rule.name in enabled)


@dataclasses.dataclass
class FoldResult(ir.passes.PassResult):
    """``PassResult`` plus the per-BN :class:`~bnfold.report.FoldReport`."""

    report: FoldReport = dataclasses.field(default_factory=lambda: FoldReport((), 0, 0))


def iter_graphs(graph: ir.Graph, label: str = "main") -> Iterator[tuple[ir.Graph, str]]:
    """The graph and all its subgraphs, depth first, each with a readable path label."""
    yield graph, label
    for node in graph:
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield from iter_graphs(attribute.as_graph(), f"{label}/{node.name}.{attribute.name}")
            elif attribute.type == ir.AttributeType.GRAPHS:
                for i, subgraph in enumerate(attribute.as_graphs()):
                    yield from iter_graphs(subgraph, f"{label}/{node.name}.{attribute.name}[{i}]")


def count_nodes(model: ir.Model) -> int:
    return sum(len(graph) for graph, _ in iter_graphs(model.graph))


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every foldable inference-mode BatchNormalization into its producer; report on every BN.

    Usable on its own (``FoldBatchNormPass()(model)``) or in an ``onnx_ir.passes.PassManager``. The
    returned :class:`FoldResult` carries the report; it is also kept as ``self.report``.
    """

    def __init__(
        self,
        *,
        only: Iterable[str] | None = None,
        skip: Iterable[str] | None = None,
        rules: Sequence[FoldRule] = DEFAULT_RULES,
    ) -> None:
        super().__init__()
        self.all_rules = {rule.op_type: rule for rule in rules}
        self.enabled_rules = {rule.op_type: rule for rule in select_rules(rules, only, skip)}
        self.report: FoldReport | None = None

    def call(self, model: ir.Model) -> FoldResult:
        nodes_before = count_nodes(model)
        constants = ConstantResolver(model)
        writer = TensorWriter(model, NameAllocator(model))
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        records: list[BatchNormRecord] = []
        for graph, label in list(iter_graphs(model.graph)):
            for index, node in enumerate(list(graph)):
                if is_batch_norm(node):
                    records.append(self._fold_one(node, label, index, opset, constants, writer))
        writer.prune_orphans()
        self.report = FoldReport(tuple(records), nodes_before, count_nodes(model))
        return FoldResult(model, modified=bool(self.report.folded), report=self.report)

    def _fold_one(
        self,
        node: ir.Node,
        graph_label: str,
        index: int,
        opset: int,
        constants: ConstantResolver,
        writer: TensorWriter,
    ) -> BatchNormRecord:
        record = BatchNormRecord(
            node=node.name or f"<unnamed #{index}>",
            graph=graph_label,
            status=FoldStatus.SKIPPED,
            reason=None,
            detail="",
            output=node.outputs[0].name if node.outputs else "",
        )
        affine: Affine | None = None
        try:
            check_inference_mode(node, opset)
            affine = batch_norm_affine(node, constants)
            producer = _producer_of(node)
            record = dataclasses.replace(record, producer=producer.op_type, producer_node=producer.name)
            self._check_foldable(node, producer)
            rule = self.enabled_rules[producer.op_type]
            record = dataclasses.replace(record, rule=rule.name)
            if not affine.is_finite():
                raise Skip(SkipReason.FOLDED_WEIGHTS_NOT_FINITE, "γ/√(var+ε) is not finite (var + ε <= 0?)")
            plan = rule.plan(producer, affine, constants)
            casts = [
                cast_checked(update.values, update.dtype, f"input {update.input_index} of {producer.op_type}")
                for update in plan.updates
            ]
        except Skip as skip:
            return _with_scale(dataclasses.replace(record, reason=skip.reason, detail=skip.detail), affine)
        for update, data in zip(plan.updates, casts, strict=True):
            writer.write(update, data)
        writer.maybe_orphaned.extend(value for value in node.inputs[1:] if value is not None)
        bypass_batch_norm(node)
        detail = f"folded into {producer.op_type} {producer.name!r}"
        return _with_scale(dataclasses.replace(record, status=FoldStatus.FOLDED, detail=detail), affine)

    def _check_foldable(self, node: ir.Node, producer: ir.Node) -> None:
        x = node.inputs[0]
        if producer.domain not in ("", "ai.onnx") or producer.op_type not in self.all_rules:
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no rule folds into {producer.op_type}")
        if producer.op_type not in self.enabled_rules:
            rule_name = self.all_rules[producer.op_type].name
            raise Skip(SkipReason.RULE_DISABLED, f"rule {rule_name!r} is disabled")
        if x.is_graph_output():
            raise Skip(SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"{x.name!r} is a graph output")
        readers = {use.node for use in x.uses()}
        if readers != {node} or len(x.uses()) != 1:
            raise Skip(SkipReason.PRODUCER_OUTPUT_SHARED, f"{x.name!r} is also read by other nodes")


def _producer_of(node: ir.Node) -> ir.Node:
    x = node.inputs[0] if node.inputs else None
    producer = x.producer() if x is not None else None
    if producer is None:
        raise Skip(SkipReason.NO_PRODUCER, "the BN input is a graph input or a constant")
    return producer


def _with_scale(record: BatchNormRecord, affine: Affine | None) -> BatchNormRecord:
    if affine is None:
        return record
    scale_min, scale_max = affine.scale_range()
    return dataclasses.replace(record, scale_min=scale_min, scale_max=scale_max)
