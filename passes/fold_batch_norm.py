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
   :class:`~bnfold.passes.rule.ForwardFoldRule` (a pad-free Conv, a Gemm, a MatMul) in the same graph —
   directly, or through a path of nodes that pass the affine on (:mod:`~bnfold.passes.forward_path`: Identity,
   inference Dropout, spatial averaging, a flatten, whose affine is then spread over each channel's features);
   a MatMul's shift goes into the ``Add(constant)`` that follows it, or a new Add;
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

from bnfold.passes import forward_path, functions
from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import is_batch_norm
from bnfold.passes.casting import cast_checked
from bnfold.passes.concat_split import ConcatSplitRule, channel_ranges, layer_channels, slice_affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.freeze_initializer_inputs import FreezeInitializerInputsPass
from bnfold.passes.graph_edit import (
    NameAllocator,
    TensorWriter,
    add_after,
    bypass,
    bypass_batch_norm,
    reads_only_metadata,
    remove_batch_norm_rewiring,
    replace_with_channel_affine,
)
from bnfold.passes.lower_standalone import RULE_NAME as LOWER_RULE_NAME
from bnfold.passes.lower_standalone import lower_batch_norm
from bnfold.passes.precision import BatchNormInput, fold_precision_cost, precision_bound
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus
from bnfold.passes.registry import DEFAULT_RULES, AnyRule, rule_names, select_rules
from bnfold.passes.rule import (
    FoldPlan,
    FoldRule,
    ForwardFoldRule,
    TensorUpdate,
    attribute_reference,
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
from bnfold.passes.through_reshape import is_reshape, match_channel_reshape, per_axis_vector, plan_matmul_columns

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


@dataclasses.dataclass
class _Attempt:
    """One direction's outcome for one BN: a ready-to-apply plan, or the ``Skip`` that stopped it."""

    forward: bool
    neighbour: ir.Node | None = None  # the producer (backward) or consumer (forward), when one exists
    matched: bool = False  # a rule exists for the neighbour's op (enabled or not)
    rule: str | None = None
    add: ConstantAdd | None = None
    rank: int | None = None
    reshape: ir.Node | None = None  # a channel-keeping Reshape/Flatten between the producer and the BN
    axis: int = 1  # the producer's channel axis (the last one for a MatMul seen through a reshape)
    reader: ir.Node | None = None  # the node that reads the producer's output (BN, Add, reshape or Concat)
    parts: tuple[_Attempt, ...] = ()  # Concat → BN: one planned fold per Concat input
    plan: FoldPlan | None = None
    casts: tuple[np.ndarray, ...] = ()
    residual: np.ndarray | None = None
    skip: Skip | None = None
    precision_cost: float | None = None  # backward: the estimate of :mod:`~bnfold.passes.precision`
    path: tuple[ir.Node, ...] = ()  # forward: the pass-through nodes between BN and the layer


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
        freeze_initializer_inputs: first remove every initializer from the main graph's inputs (IR >= 4), so
            that BNs whose parameters were overridable defaults fold; changes the model's interface (see
            :mod:`bnfold.passes.freeze_initializer_inputs`); the report lists the frozen inputs.
        precision_guard: skip (``FOLD_LOSES_PRECISION``) a fold whose estimated rounding error in the weights'
            dtype exceeds the original's beyond :func:`~bnfold.passes.precision.precision_bound`; ``False``
            folds anyway (the estimate is still recorded).
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
        freeze_initializer_inputs: bool = False,
        precision_guard: bool = True,
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
        self.freeze_initializer_inputs = freeze_initializer_inputs
        self.precision_guard = precision_guard
        self.report: FoldReport | None = None
        self._constants: ConstantResolver | None = None
        self._writer: TensorWriter | None = None

    def call(self, model: ir.Model) -> FoldResult:
        frozen = FreezeInitializerInputsPass()(model).frozen if self.freeze_initializer_inputs else ()
        scopes = list(main_scopes(model))
        nodes_before = count_nodes(model, scopes)
        self._constants = ConstantResolver(model)
        self._writer = TensorWriter(model, NameAllocator(model))
        records = self.fold_scopes(scopes)
        records += functions.fold_functions(model, self, self._constants, self._writer)
        self._writer.prune_orphans()
        self.report = FoldReport(tuple(records), nodes_before, count_nodes(model), frozen_inputs=frozen)
        return FoldResult(model, modified=bool(self.report.folded or frozen), report=self.report)

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
        self._guard_precision(node, attempt, affine)
        if attempt.skip is not None:
            forward = self._attempt_forward(node, affine, scope.opset)
            if forward.skip is None or (not attempt.matched and forward.neighbour is not None):
                attempt = forward
        neighbour = attempt.neighbour
        rule = attempt.rule if neighbour is not None else None
        record_of = functools.partial(
            new_record, node, scope, index, neighbour=neighbour, affine=affine, precision_cost=attempt.precision_cost
        )
        if attempt.skip is None:
            output = neighbour.outputs[0].name if attempt.forward else None  # (before a new Add takes the name)
            rewritten = self._apply(node, attempt)
            where = "consuming" if attempt.forward else "into"
            detail = f"folded {where} {neighbour.op_type} {neighbour.name!r}"
            if attempt.path:
                detail += " across " + ", ".join(f"{step.op_type} {step.name!r}" for step in attempt.path)
            if attempt.add is not None:
                detail += f" through Add {attempt.add.node.name!r}"
            if attempt.reshape is not None:
                detail += f" through {attempt.reshape.op_type} {attempt.reshape.name!r}"
            if attempt.parts:
                layers = (part.neighbour for part in attempt.parts)
                detail += " split into " + ", ".join(f"{layer.op_type} {layer.name!r}" for layer in layers)
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
            producer = self._producer(node.inputs[0], node, attempt)
            rule = self.enabled_rules[producer.op_type]
            attempt.rule = rule.name
            if isinstance(rule, ConcatSplitRule):
                self._plan_split(attempt, producer, rule, affine)
            else:
                self._plan_layer(attempt, producer, rule, affine)
        except Skip as skip:
            attempt.skip = skip
        return attempt

    def _plan_layer(self, attempt: _Attempt, producer: ir.Node, rule: FoldRule, affine: Affine) -> None:
        """Plan folding ``affine`` into ``producer`` (through the Add and the reshape ``attempt`` holds)."""
        reference = attribute_reference(producer)
        if reference is not None:
            raise Skip(SkipReason.ATTRIBUTE_IS_REFERENCE, f"attribute {reference!r} of {producer.op_type}")
        if attempt.reshape is not None:
            kept = match_channel_reshape(attempt.reshape, producer, affine.channels, self._constants)
            attempt.rank, attempt.axis = kept.rank, kept.axis
        if attempt.add is not None:
            if attempt.rank is None:
                attempt.rank = rule.output_rank(producer, self._constants)
            if attempt.rank is None:
                attempt.rank = self._constants.rank(attempt.add.runtime_value)
            if attempt.rank is None:
                raise Skip(SkipReason.RANK_UNKNOWN, f"the rank of {producer.op_type}'s output is unknown")
            try:
                if attempt.axis == 1:
                    added = per_channel_vector(attempt.add.constant, attempt.rank, affine.channels)
                else:
                    added = per_axis_vector(attempt.add.constant, attempt.rank, attempt.axis, affine.channels)
            except Skip:
                self._layer_plan(attempt, producer, rule, affine)  # a root cause in the layer itself comes first
                raise
            affine = absorb_added_constant(affine, added)
        plan = self._layer_plan(attempt, producer, rule, affine)
        if plan.residual_shift is not None and attempt.rank is None:  # the rank is needed only for a shift
            attempt.rank = rule.output_rank(producer, self._constants)
        self._plan(attempt, producer, plan)

    def _layer_plan(self, attempt: _Attempt, producer: ir.Node, rule: FoldRule, affine: Affine) -> FoldPlan:
        """``rule``'s plan for ``producer`` (changes nothing; ``Skip`` when the layer cannot hold ``affine``)."""
        if attempt.axis != 1:  # a MatMul whose channel is its last axis (LeViT's Linear → Flatten → BN)
            return plan_matmul_columns(producer, affine, self._constants)
        return rule.plan(producer, affine, self._constants)

    def _plan_split(self, attempt: _Attempt, concat: ir.Node, rule: ConcatSplitRule, affine: Affine) -> None:
        """Plan one fold per Concat input, each with its range of BN's channels (:mod:`~bnfold.passes.concat_split`).

        All or nothing: the first part that cannot fold raises its ``Skip``, naming the Concat input.
        """
        if attempt.add is not None or attempt.reshape is not None:
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, "a Concat is split only when the BN reads it directly")
        parts: list[tuple[_Attempt, ir.Node, FoldRule]] = []
        for index, value in enumerate(rule.inputs(concat, self._constants)):
            part = _Attempt(forward=False)
            try:
                layer = self._producer(value, concat, part)
                part_rule = self.enabled_rules[layer.op_type]
                if isinstance(part_rule, ConcatSplitRule):
                    raise Skip(SkipReason.UNSUPPORTED_PRODUCER, "a Concat of a Concat is not split")
                part.rule = part_rule.name
                parts.append((part, layer, part_rule))
            except Skip as skip:
                attempt.matched = part.matched
                raise _part_skip(index, value, skip) from None
        counts = []
        for index, (_, layer, _) in enumerate(parts):
            try:
                counts.append(layer_channels(layer, self._constants))
            except Skip as skip:
                raise _part_skip(index, concat.inputs[index], skip) from None
        ranges = channel_ranges(counts, affine.channels)
        for index, ((part, layer, part_rule), (start, stop)) in enumerate(zip(parts, ranges, strict=True)):
            try:
                self._plan_layer(part, layer, part_rule, slice_affine(affine, start, stop))
            except Skip as skip:
                raise _part_skip(index, concat.inputs[index], skip) from None
        attempt.parts = tuple(part for part, _, _ in parts)

    def _producer(self, value: ir.Value | None, reader: ir.Node, attempt: _Attempt) -> ir.Node:
        """The layer that makes ``value`` for ``reader`` (the BN, or a Concat being split), looking through a
        channel-keeping reshape and a constant Add; ``Skip`` when there is none."""
        producer = value.producer() if value is not None else None
        if producer is None:
            raise Skip(SkipReason.NO_PRODUCER, f"the {_input_label(reader)} is a graph input or a constant")
        attempt.neighbour = producer
        if is_reshape(producer):
            source = producer.inputs[0] if producer.inputs else None
            behind = source.producer() if source is not None else None
            if behind is None or not self._has_rule(self._layer_behind(behind)):
                what = "a graph input" if behind is None else behind.op_type
                raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no rule folds into {producer.op_type} (of {what})")
            _check_readers(value, reader, producer)
            attempt.neighbour, attempt.reshape = behind, producer
            value, reader, producer = source, producer, behind
        if is_add(producer):
            add = match_constant_add(producer, self._constants)
            inner = add.runtime_value.producer() if add is not None else None
            if inner is None or not self._has_rule(inner):
                raise Skip(SkipReason.UNSUPPORTED_PRODUCER, _add_without_rule(add, inner))
            _check_readers(value, reader, producer)
            attempt.neighbour, attempt.add = inner, add
            value, reader, producer = add.runtime_value, producer, inner
        if not self._has_rule(producer):
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no rule folds into {producer.op_type}")
        attempt.matched = True
        if producer.op_type not in self.enabled_rules:
            raise Skip(SkipReason.RULE_DISABLED, f"rule {self.all_rules[producer.op_type].name!r} is disabled")
        _check_readers(value, reader, producer)
        attempt.reader = reader
        return producer

    def _has_rule(self, node: ir.Node | None) -> bool:
        return node is not None and node.domain in ("", "ai.onnx") and node.op_type in self.all_rules

    def _layer_behind(self, node: ir.Node) -> ir.Node | None:
        """``node``, or the producer of its runtime input when it is an Add of one constant."""
        if not is_add(node):
            return node
        add = match_constant_add(node, self._constants)
        return add.runtime_value.producer() if add is not None else None

    # -- forward: BN → [Identity / Dropout / pooling / Flatten →] Conv, Gemm, MatMul --------------------------

    def _attempt_forward(self, node: ir.Node, affine: Affine, opset: int) -> _Attempt:
        attempt = _Attempt(forward=True)
        try:
            path = forward_path.follow(node)
            attempt.path = path.nodes
            consumer = self._forward_consumer(node, path, attempt)
            rule = self.enabled_forward[consumer.op_type]
            attempt.rule = rule.name
            for neighbour in (*path.nodes, consumer):
                reference = attribute_reference(neighbour)
                if reference is not None:
                    raise Skip(SkipReason.ATTRIBUTE_IS_REFERENCE, f"attribute {reference!r} of {neighbour.op_type}")
            if forward_path.check(path, opset, self._constants):
                if not isinstance(rule, forward_path.TakesFlattenedInput):
                    raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"rule {rule.name!r} cannot fold through a flatten")
                affine = forward_path.spread(affine, rule.input_features(consumer, self._constants))
            plan = rule.plan_forward(consumer, affine, self._constants)
            if plan.residual_shift is not None:  # per output feature of a 2-D layer output (MatMul: no bias)
                attempt.rank = 2
                following = _following_add(consumer, self._constants, plan.residual_shift.shape[0])
                if following is not None:
                    attempt.add, added = following
                    plan = dataclasses.replace(plan, residual_shift=added + plan.residual_shift)
            self._plan(attempt, consumer, plan)
        except Skip as skip:
            attempt.skip = skip
        return attempt

    def _forward_consumer(self, batch_norm: ir.Node, path: forward_path.ForwardPath, attempt: _Attempt) -> ir.Node:
        """The enabled forward layer that alone reads the end of ``path``; ``Skip`` when there is none.

        A path that branches (or ends in a graph output) where a branch could go on folding is reported with its
        own reason; otherwise ``neighbour`` stays unset, so the backward reason stands.
        """
        end, last = path.end, (path.nodes[-1] if path.nodes else None)
        readers = forward_path.data_readers(end)
        shared = end.is_graph_output() or len(readers) > 1
        if last is not None and shared and any(self._continues_forward(reader) for reader in readers):
            attempt.neighbour = last
            if end.is_graph_output():
                raise Skip(SkipReason.FORWARD_PATH_IS_GRAPH_OUTPUT, f"{end.name!r} of {last.op_type} is a graph output")
            raise Skip(SkipReason.FORWARD_PATH_BRANCHES, f"{end.name!r} of {last.op_type} has {len(readers)} readers")
        consumer = forward_path.sole_reader(end)
        if consumer is None:
            what = "BN's output" if last is None else f"the output of {last.op_type} after BN"
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"{what} does not feed exactly one node")
        if consumer.domain not in ("", "ai.onnx") or consumer.op_type not in self.all_forward:
            after = "" if last is None else f" after {last.op_type}"
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"no forward rule for {consumer.op_type}{after}")
        attempt.neighbour = consumer
        for step in (*path.nodes, consumer):
            if step.graph is not batch_norm.graph:
                raise Skip(SkipReason.NEIGHBOUR_IN_OTHER_GRAPH, f"{step.op_type} reads BN's output from a subgraph")
        if consumer.op_type not in self.enabled_forward:
            name = self.all_forward[consumer.op_type].name
            raise Skip(SkipReason.RULE_DISABLED, f"rule {name!r} is disabled")
        return consumer

    def _continues_forward(self, node: ir.Node) -> bool:
        """Whether a forward fold could go on through ``node`` (a pass-through node or a layer with a rule)."""
        return forward_path.is_pass_through(node) or (
            node.domain in ("", "ai.onnx") and node.op_type in self.all_forward
        )

    def _guard_precision(self, node: ir.Node, attempt: _Attempt, affine: Affine) -> None:
        """Estimate what a planned backward fold costs in the weights' dtype (:mod:`~bnfold.passes.precision`);
        beyond the bound, turn the plan into a ``FOLD_LOSES_PRECISION`` skip (the graph is still unchanged)."""
        if attempt.skip is not None or attempt.forward:
            return
        plans = [part.plan for part in attempt.parts or (attempt,)]
        statistics = BatchNormInput.of_affine(affine) or BatchNormInput.of_node(node, self._constants)
        estimate = fold_precision_cost(statistics, plans)
        if estimate is None:
            return
        attempt.precision_cost, dtype = estimate
        bound = precision_bound(dtype)
        if self.precision_guard and attempt.precision_cost > bound:
            attempt.skip = Skip(
                SkipReason.FOLD_LOSES_PRECISION,
                f"{dtype.name} folded weights would round ~{attempt.precision_cost:.3g}x worse (bound {bound:.3g})",
            )

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
            channels = plan.residual_shift.shape[0]
            shape = (channels,) + (1,) * (attempt.rank - 1 - attempt.axis)  # (channel_shape when the axis is 1)
            attempt.residual = cast_checked(plan.residual_shift.reshape(shape), plan.residual_dtype, "shift")
        attempt.plan = plan

    def _apply(self, node: ir.Node, attempt: _Attempt) -> tuple[ir.Node, ...]:
        """Change the graph as ``attempt`` planned; return the nodes whose inputs were rewritten, each once."""
        writer = self._writer
        rewritten: dict[int, ir.Node] = {}
        parts = attempt.parts or (attempt,)
        for part in parts:
            self._write_plan(part, rewritten)
        writer.maybe_orphaned.extend(value for value in node.inputs[1:] if value is not None)
        hint = f"{node.outputs[0].name}_shift"
        if attempt.forward:  # the first path node (or the layer) reads BN's input; MatMul's shift goes after it
            remove_batch_norm_rewiring(node)
            self._place_shift(attempt, hint, rewritten)
            return tuple(rewritten.values())
        if attempt.reader is node and attempt.residual is not None:  # MatMul → BN: the BN becomes the Add
            shift = writer.constant(node, attempt.residual, attempt.plan.residual_dtype, hint)
            replace_with_channel_affine(node, None, shift, writer.names)
            return tuple(rewritten.values())
        for part in parts:
            self._place_shift(part, hint, rewritten)
        bypass_batch_norm(node)
        return tuple(rewritten.values())

    def _write_plan(self, attempt: _Attempt, rewritten: dict[int, ir.Node]) -> None:
        for update, data in zip(attempt.plan.updates, attempt.casts, strict=True):
            self._writer.write(update, data)
            rewritten.setdefault(id(update.node), update.node)
        for attribute_update in attempt.plan.attributes:
            attribute_update.node.attributes[attribute_update.attribute.name] = attribute_update.attribute

    def _place_shift(self, attempt: _Attempt, hint: str, rewritten: dict[int, ir.Node]) -> None:
        """Put the shift the layer cannot hold into its Add (or a new Add after it); drop an absorbed Add."""
        writer, add, dtype = self._writer, attempt.add, attempt.plan.residual_dtype
        if add is not None and attempt.residual is not None:
            writer.write(TensorUpdate(add.node, add.constant_index, attempt.residual, dtype, hint), attempt.residual)
            rewritten.setdefault(id(add.node), add.node)
        elif add is not None:
            writer.maybe_orphaned.append(add.node.inputs[add.constant_index])
            bypass(add.node, add.runtime_value)
        elif attempt.residual is not None:  # right after the MatMul (before a reshape, a Concat, or forward)
            shift = writer.constant(attempt.neighbour, attempt.residual, dtype, hint)
            add_after(attempt.neighbour, shift, writer.names)


def _check_readers(value: ir.Value, reader: ir.Node, producer: ir.Node) -> None:
    """``value`` (made by ``producer``) must be read by ``reader`` alone, in its graph, and not be an output."""
    if producer.graph is not reader.graph:
        raise Skip(SkipReason.NEIGHBOUR_IN_OTHER_GRAPH, f"{producer.op_type} {producer.name!r} is in an outer graph")
    if value.is_graph_output():
        raise Skip(SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"{value.name!r} is a graph output")
    uses = [use for use in value.uses() if not reads_only_metadata(use.node, use.idx)]  # kept by a fold
    if len(uses) != 1 or uses[0].node is not reader:
        raise Skip(SkipReason.PRODUCER_OUTPUT_SHARED, f"{value.name!r} is also read by other nodes")


def _following_add(layer: ir.Node, constants: ConstantResolver, features: int) -> tuple[ConstantAdd, np.ndarray] | None:
    """The ``Add(constant)`` that alone reads ``layer``'s 2-D output, with its constant as a float64 ``[F]``
    vector, when that constant is per output feature; ``None`` otherwise (the shift then gets an Add of its own)."""
    output = layer.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1 or not is_add(uses[0].node) or uses[0].node.graph is not layer.graph:
        return None
    add = match_constant_add(uses[0].node, constants)
    if add is None or add.runtime_value is not output:
        return None
    try:
        return add, per_channel_vector(add.constant, 2, features)
    except Skip:
        return None


def _input_label(reader: ir.Node) -> str:
    return "BN input" if is_batch_norm(reader) else f"input of {reader.op_type} {reader.name!r}"


def _part_skip(index: int, value: ir.Value, skip: Skip) -> Skip:
    """A Concat part's ``Skip``, its detail naming the Concat input."""
    return Skip(skip.reason, f"Concat input {index} ({value.name!r}): {skip.detail}")


def _add_without_rule(add: ConstantAdd | None, inner: ir.Node | None) -> str:
    if add is None:
        return "no rule folds into Add (it does not add exactly one constant)"
    if inner is None:
        return "Add of a constant to a graph input: no layer to fold into"
    return f"no rule folds into Add after {inner.op_type}"
