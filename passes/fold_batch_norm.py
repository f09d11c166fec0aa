"""The driver: one loop over every BatchNormalization, shared preconditions, then a neighbour's rule.

For each BN node (main graph, every If/Loop/Scan body, every model-local function body; in graph order):

1. in a function body, an opset where ``Constant`` has the model's schema (``FUNCTION_OPSET_DIFFERS``);
   inference mode, per-channel statistics, no function-attribute references
   (:func:`~bnfold.passes.scopes.inference_affine`);
2. constant 1-D parameters → float64 :class:`~bnfold.passes.affine.Affine`, finite;
3. **backward**: the producer of BN's input — directly, or through ``Add(constant)``
   (:mod:`~bnfold.passes.through_add`) — has an enabled :class:`~bnfold.passes.rule.FoldRule`, lives in the
   same graph, and its output (and the Add's) feeds only this BN and is not a graph output;
4. **forward**, when the backward fold fails: BN's output feeds only input 0 of a node with an enabled
   :class:`~bnfold.passes.rule.ForwardFoldRule` (a pad-free Conv) in the same graph;
5. the rule's :class:`~bnfold.passes.rule.FoldPlan`, every tensor cast once with range checks;
6. only then the graph changes: tensors and attributes written, the shift the producer cannot hold placed in
   an Add, BN (and an absorbed Add) removed, orphans pruned;
7. with ``lower_standalone=True``, a BN no rule folds becomes ``Mul`` + ``Add``
   (:mod:`~bnfold.passes.lower_standalone`).

Any failed step records exactly one :class:`~bnfold.passes.reasons.SkipReason` and leaves the BN untouched.
When both directions fail, the backward reason is reported if a backward rule matched the producer, the
forward reason otherwise (a BN after a Relu in front of a padded Conv reports ``CONV_HAS_PADDING``).

Function bodies are folded first as they stand (weights as ``Constant`` nodes); BNs there that need call
arguments are then folded per call site by specialisation (:mod:`~bnfold.passes.functions`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from bnfold.passes import functions
from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import is_batch_norm
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.conv import ConvRule
from bnfold.passes.conv_transpose import ConvTransposeRule
from bnfold.passes.forward_conv import ForwardConvRule
from bnfold.passes.gemm import GemmRule
from bnfold.passes.graph_edit import (
    NameAllocator,
    TensorWriter,
    bypass,
    bypass_batch_norm,
    remove_batch_norm_before,
    replace_with_channel_affine,
)
from bnfold.passes.lower_standalone import RULE_NAME as LOWER_RULE_NAME
from bnfold.passes.lower_standalone import lower_batch_norm
from bnfold.passes.matmul import MatMulRule
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus
from bnfold.passes.rule import (
    FoldPlan,
    FoldRule,
    ForwardFoldRule,
    TensorUpdate,
    attribute_reference,
    cast_checked,
    channel_shape,
)
from bnfold.passes.scopes import (
    FoldResult,
    Scope,
    count_nodes,
    function_scopes,
    inference_affine,
    iter_graphs,
    main_scopes,
    new_record,
    require_finite,
)
from bnfold.passes.through_add import (
    ConstantAdd,
    absorb_added_constant,
    is_add,
    match_constant_add,
    per_channel_vector,
)

AnyRule = FoldRule | ForwardFoldRule

DEFAULT_RULES: tuple[AnyRule, ...] = (
    ConvRule(),
    ConvTransposeRule(),
    GemmRule(),
    MatMulRule(),
    ForwardConvRule(),
)

__all__ = [
    "DEFAULT_RULES",
    "FoldBatchNormPass",
    "FoldResult",
    "FoldedCallback",
    "count_nodes",
    "iter_graphs",
    "rule_names",
    "select_rules",
]


FoldedCallback = Callable[[BatchNormRecord, tuple[ir.Node, ...]], None]
"""``on_folded(record, rewritten)``: called once per folded BN, right after the graph changed.

``record`` is the BN's ``FOLDED`` record; ``rewritten`` are the nodes whose inputs the fold replaced (the
producer or forward consumer, and the ``Add`` whose constant became the residual shift), each once, in the
order they were written. The callback may replace the ``const_value`` of those inputs by an equal tensor
(e.g. move it to external data) but must not change the graph's structure.
"""


def rule_names(rules: Sequence[AnyRule] = DEFAULT_RULES) -> tuple[str, ...]:
    return tuple(rule.name for rule in rules)


def select_rules(
    rules: Sequence[AnyRule], only: Iterable[str] | None = None, skip: Iterable[str] | None = None
) -> tuple[AnyRule, ...]:
    """The rules enabled by ``only``/``skip``; unknown names raise ``ValueError`` naming the known ones."""
    only = None if only is None else list(only)
    skip = list(skip or ())
    known = rule_names(rules)
    unknown = sorted((set(only or ()) | set(skip)) - set(known))
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; known rules: {', '.join(known)}")
    enabled = set(only) if only is not None else set(known)
    enabled -= set(skip)
    return tuple(rule for rule in rules if rule.name in enabled)


@dataclasses.dataclass
class _Attempt:
    """One direction's outcome for one BN: a ready-to-apply plan, or the ``Skip`` that stopped it."""

    forward: bool
    neighbour: ir.Node | None = None  # the producer (backward) or consumer (forward), when one exists
    matched: bool = False  # a rule exists for the neighbour's op (enabled or not)
    rule: str | None = None
    add: ConstantAdd | None = None
    rank: int | None = None
    plan: FoldPlan | None = None
    casts: tuple[np.ndarray, ...] = ()
    residual: np.ndarray | None = None
    skip: Skip | None = None


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every foldable inference-mode BatchNormalization into a neighbour; report on every BN.

    Usable on its own (``FoldBatchNormPass()(model)``) or in an ``onnx_ir.passes.PassManager``. The
    returned :class:`FoldResult` carries the report; it is also kept as ``self.report``.

    Args:
        only: rule names to enable (default: all of ``rules``); unknown names raise ``ValueError``.
        skip: rule names to disable.
        rules: backward (:class:`FoldRule`) and forward (:class:`ForwardFoldRule`) rules to choose from.
        lower_standalone: replace every BN that no rule folds by ``Mul`` + ``Add``.
        specialise_functions: fold BNs of model-local functions per call site when their weights arrive as
            constant call arguments (see :mod:`bnfold.passes.functions`).
        on_folded: a :data:`FoldedCallback` called after each BN folds (e.g. to write the folded tensors out
            at once and release their memory); constant work per BN.
    """

    def __init__(
        self,
        *,
        only: Iterable[str] | None = None,
        skip: Iterable[str] | None = None,
        rules: Sequence[AnyRule] = DEFAULT_RULES,
        lower_standalone: bool = False,
        specialise_functions: bool = True,
        on_folded: FoldedCallback | None = None,
    ) -> None:
        super().__init__()
        enabled = select_rules(rules, only, skip)
        self.all_rules = {rule.op_type: rule for rule in rules if not isinstance(rule, ForwardFoldRule)}
        self.enabled_rules = {rule.op_type: rule for rule in enabled if not isinstance(rule, ForwardFoldRule)}
        self.all_forward = {rule.op_type: rule for rule in rules if isinstance(rule, ForwardFoldRule)}
        self.enabled_forward = {rule.op_type: rule for rule in enabled if isinstance(rule, ForwardFoldRule)}
        self.lower_standalone = lower_standalone
        self.specialise_functions = specialise_functions
        self.on_folded = on_folded
        self.report: FoldReport | None = None
        self._constants: ConstantResolver | None = None
        self._writer: TensorWriter | None = None

    def call(self, model: ir.Model) -> FoldResult:
        scopes = list(main_scopes(model))
        nodes_before = count_nodes(model, scopes)
        self._constants = ConstantResolver(model)
        self._writer = TensorWriter(model, NameAllocator(model))
        records = self.fold_scopes(scopes)
        records += functions.fold_functions(model, self, self._constants, self._writer)
        self._writer.prune_orphans()
        self.report = FoldReport(tuple(records), nodes_before, count_nodes(model))
        return FoldResult(model, modified=bool(self.report.folded), report=self.report)

    def fold_scopes(self, scopes: Iterable[Scope]) -> list[BatchNormRecord]:
        """Fold every BN of ``scopes`` (used for graphs here and for function bodies by ``functions``)."""
        records = []
        for scope in list(scopes):
            for index, node in enumerate(list(scope.graph)):
                if is_batch_norm(node):
                    records.append(self._fold_one(node, scope, index))
        return records

    def fold_function(self, function: ir.Function, model_opset: int) -> list[BatchNormRecord]:
        return self.fold_scopes(function_scopes(function, model_opset))

    def _fold_one(self, node: ir.Node, scope: Scope, index: int) -> BatchNormRecord:
        """Fold (or lower, or skip) one BN; its record is built once, when the outcome is known."""
        affine: Affine | None = None
        try:
            if not scope.can_add_constants:
                raise Skip(
                    SkipReason.FUNCTION_OPSET_DIFFERS,
                    f"{scope.label} imports opset {scope.opset}; Constant differs from the model's opset",
                )
            affine = inference_affine(node, scope.opset, self._constants)
            require_finite(affine)
        except Skip as skip:
            return new_record(node, scope, index, reason=skip.reason, detail=skip.detail, affine=affine)
        attempt = self._attempt_backward(node, affine)
        if attempt.skip is not None:
            forward = self._attempt_forward(node, affine)
            if forward.skip is None or (not attempt.matched and forward.neighbour is not None):
                attempt = forward
        neighbour = attempt.neighbour
        rule = attempt.rule if neighbour is not None else None
        record_of = functools.partial(new_record, node, scope, index, neighbour=neighbour, affine=affine)
        if attempt.skip is None:
            rewritten = self._apply(node, attempt)
            where = "consuming" if attempt.forward else "into"
            detail = f"folded {where} {neighbour.op_type} {neighbour.name!r}"
            if attempt.add is not None:
                detail += f" through Add {attempt.add.node.name!r}"
            output = neighbour.outputs[0].name if attempt.forward else None
            record = record_of(status=FoldStatus.FOLDED, detail=detail, output=output, rule=rule)
            if self.on_folded is not None:
                self.on_folded(record, rewritten)
            return record
        skip = attempt.skip
        if self.lower_standalone:
            try:
                detail = lower_batch_norm(node, affine, self._constants, self._writer)
                detail += f" (not folded: {skip.reason.value}: {skip.detail})"
                return record_of(status=FoldStatus.LOWERED, detail=detail, rule=LOWER_RULE_NAME)
            except Skip as lowering_skip:
                skip = Skip(lowering_skip.reason, f"not lowered: {lowering_skip.detail} (not folded: {skip})")
        return record_of(reason=skip.reason, detail=skip.detail, rule=rule)

    # -- backward: producer → [Add(constant) →] BN -----------------------------------------------------------

    def _attempt_backward(self, node: ir.Node, affine: Affine) -> _Attempt:
        attempt = _Attempt(forward=False)
        try:
            producer = self._producer(node, attempt)
            rule = self.enabled_rules[producer.op_type]
            attempt.rule = rule.name
            reference = attribute_reference(producer)
            if reference is not None:
                raise Skip(SkipReason.ATTRIBUTE_IS_REFERENCE, f"attribute {reference!r} of {producer.op_type}")
            if attempt.add is not None:
                attempt.rank = rule.output_rank(producer, self._constants)
                if attempt.rank is None:
                    attempt.rank = self._constants.rank(attempt.add.runtime_value)
                if attempt.rank is None:
                    raise Skip(SkipReason.RANK_UNKNOWN, f"the rank of {producer.op_type}'s output is unknown")
                added = per_channel_vector(attempt.add.constant, attempt.rank, affine.channels)
                affine = absorb_added_constant(affine, added)
            plan = rule.plan(producer, affine, self._constants)
            if plan.residual_shift is not None and attempt.add is None:  # the rank is needed only for a shift
                attempt.rank = rule.output_rank(producer, self._constants)
            self._plan(attempt, producer, plan)
        except Skip as skip:
            attempt.skip = skip
        return attempt

    def _producer(self, batch_norm: ir.Node, attempt: _Attempt) -> ir.Node:
        """The node to fold into (through a constant Add when there is one); ``Skip`` when there is none."""
        value, reader = batch_norm.inputs[0], batch_norm
        producer = value.producer() if value is not None else None
        if producer is None:
            raise Skip(SkipReason.NO_PRODUCER, "the BN input is a graph input or a constant")
        attempt.neighbour = producer
        if is_add(producer):
            add = match_constant_add(producer, self._constants)
            inner = add.runtime_value.producer() if add is not None else None
            if inner is None or inner.domain not in ("", "ai.onnx") or inner.op_type not in self.all_rules:
                raise Skip(SkipReason.UNSUPPORTED_PRODUCER, _add_without_rule(add, inner))
            _check_readers(value, reader, producer)
            attempt.neighbour, attempt.add = inner, add
            value, reader, producer = add.runtime_value, producer, inner
        if producer.domain not in ("", "ai.onnx") or producer.op_type not in self.all_rules:
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no rule folds into {producer.op_type}")
        attempt.matched = True
        if producer.op_type not in self.enabled_rules:
            raise Skip(SkipReason.RULE_DISABLED, f"rule {self.all_rules[producer.op_type].name!r} is disabled")
        _check_readers(value, reader, producer)
        return producer

    # -- forward: BN → Conv ------------------------------------------------------------------------------------

    def _attempt_forward(self, node: ir.Node, affine: Affine) -> _Attempt:
        attempt = _Attempt(forward=True)
        try:
            y = node.outputs[0]
            uses = list(y.uses())
            consumer = uses[0].node if len(uses) == 1 and not y.is_graph_output() else None
            if consumer is None or uses[0].idx != 0 or consumer.domain not in ("", "ai.onnx"):
                raise Skip(SkipReason.UNSUPPORTED_PRODUCER, "BN's output does not feed exactly one node")
            if consumer.op_type not in self.all_forward:
                raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no forward rule for {consumer.op_type}")
            attempt.neighbour = consumer
            if consumer.graph is not node.graph:
                raise Skip(SkipReason.NEIGHBOUR_IN_OTHER_GRAPH, f"{consumer.op_type} reads BN's output from a subgraph")
            if consumer.op_type not in self.enabled_forward:
                name = self.all_forward[consumer.op_type].name
                raise Skip(SkipReason.RULE_DISABLED, f"rule {name!r} is disabled")
            rule = self.enabled_forward[consumer.op_type]
            attempt.rule = rule.name
            reference = attribute_reference(consumer)
            if reference is not None:
                raise Skip(SkipReason.ATTRIBUTE_IS_REFERENCE, f"attribute {reference!r} of {consumer.op_type}")
            self._plan(attempt, consumer, rule.plan_forward(consumer, affine, self._constants))
        except Skip as skip:
            attempt.skip = skip
        return attempt

    # -- shared: cast, then apply ------------------------------------------------------------------------------

    @staticmethod
    def _plan(attempt: _Attempt, neighbour: ir.Node, plan: FoldPlan) -> None:
        """Cast every planned tensor once (any overflow skips before the graph changes)."""
        attempt.casts = tuple(
            cast_checked(
                update.values, update.dtype, f"input {update.input_index} of {neighbour.op_type}", update.row_scale
            )
            for update in plan.updates
        )
        if plan.residual_shift is not None:
            if attempt.rank is None:
                raise Skip(SkipReason.RANK_UNKNOWN, f"the rank of {neighbour.op_type}'s output is unknown")
            shape = channel_shape(plan.residual_shift.shape[0], attempt.rank)
            attempt.residual = cast_checked(plan.residual_shift.reshape(shape), plan.residual_dtype, "shift")
        attempt.plan = plan

    def _apply(self, node: ir.Node, attempt: _Attempt) -> tuple[ir.Node, ...]:
        """Change the graph as ``attempt`` planned; return the nodes whose inputs were rewritten, each once."""
        writer, plan = self._writer, attempt.plan
        rewritten: dict[int, ir.Node] = {}
        for update, data in zip(plan.updates, attempt.casts, strict=True):
            writer.write(update, data)
            rewritten.setdefault(id(update.node), update.node)
        for attribute_update in plan.attributes:
            attribute_update.node.attributes[attribute_update.attribute.name] = attribute_update.attribute
        writer.maybe_orphaned.extend(value for value in node.inputs[1:] if value is not None)
        if attempt.forward:
            remove_batch_norm_before(node, attempt.neighbour)
            return tuple(rewritten.values())
        add, hint = attempt.add, f"{node.outputs[0].name}_shift"
        if add is not None and attempt.residual is not None:
            update = TensorUpdate(add.node, add.constant_index, attempt.residual, plan.residual_dtype, hint)
            writer.write(update, attempt.residual)
            rewritten.setdefault(id(add.node), add.node)
            bypass_batch_norm(node)
        elif add is not None:
            writer.maybe_orphaned.append(add.node.inputs[add.constant_index])
            bypass(add.node, add.runtime_value)
            bypass_batch_norm(node)
        elif attempt.residual is not None:
            shift = writer.constant(node, attempt.residual, plan.residual_dtype, hint)
            replace_with_channel_affine(node, None, shift, writer.names)
        else:
            bypass_batch_norm(node)
        return tuple(rewritten.values())


def _check_readers(value: ir.Value, reader: ir.Node, producer: ir.Node) -> None:
    """``value`` (made by ``producer``) must be read by ``reader`` alone, in its graph, and not be an output."""
    if producer.graph is not reader.graph:
        raise Skip(SkipReason.NEIGHBOUR_IN_OTHER_GRAPH, f"{producer.op_type} {producer.name!r} is in an outer graph")
    if value.is_graph_output():
        raise Skip(SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"{value.name!r} is a graph output")
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node is not reader:
        raise Skip(SkipReason.PRODUCER_OUTPUT_SHARED, f"{value.name!r} is also read by other nodes")


def _add_without_rule(add: ConstantAdd | None, inner: ir.Node | None) -> str:
    if add is None:
        return "no rule folds into Add (it does not add exactly one constant)"
    if inner is None:
        return "Add of a constant to a graph input: no layer to fold into"
    return f"no rule folds into Add after {inner.op_type}"
