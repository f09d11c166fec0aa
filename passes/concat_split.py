"""Split ``Concat(axis=1) → BatchNormalization`` into the layers that make the Concat's inputs.

mixnet's mixed kernels (and Inception-style branches) run several Convs side by side, concatenate their
outputs on the channel axis and normalise the result with one BN. Concat on axis 1 only lays its inputs'
channels side by side: input ``i`` with ``n_i`` channels fills BN's channels ``o_i .. o_i + n_i − 1``
(``o_i = n_0 + … + n_{i−1}``). BN is per channel, so with ``s``, ``t`` from
:class:`~bnfold.passes.affine.Affine`::

    BN(Concat(Y_0, …, Y_{k−1}))[:, o_i + j, …] = s[o_i + j] · Y_i[:, j, …] + t[o_i + j]

which is input ``i``'s own layer folded with the affine ``(s[o_i : o_i + n_i], t[o_i : o_i + n_i])``. Each part
folds by its layer's rule exactly as a direct ``layer → BN`` would (Conv, ConvTranspose, Gemm, MatMul, each
optionally followed by ``Add(c)`` (:mod:`~bnfold.passes.through_add`) or by a channel-keeping reshape
(:mod:`~bnfold.passes.through_reshape`)). A MatMul part keeps its shift in its Add, or in a new ``Add`` between the
MatMul and the Concat. The Concat stays; the BN is removed and its output name is carried by the Concat's output.

All or nothing: the driver plans and cast-checks every part before it changes anything; if one part cannot
fold, the BN stays, with that part's reason (its detail names the Concat input).

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- the Concat's ``axis`` is the channel axis 1; a negative axis is normalised with the rank of the Concat's
  output or inputs (``CONCAT_AXIS_NOT_CHANNEL``; ``RANK_UNKNOWN`` when a negative axis meets an unknown rank);
- no value feeds the Concat twice (``CONCAT_INPUT_REPEATED``);
- the Concat's output feeds only the BN and is not a graph output (the driver's checks, as for any producer);
- every input is made by a layer with an enabled rule (``UNSUPPORTED_PRODUCER``, ``RULE_DISABLED``; a Concat
  of Concats is not split), in the same graph, its output read only by the Concat and not a graph output
  (``NEIGHBOUR_IN_OTHER_GRAPH``, ``PRODUCER_OUTPUT_SHARED``, ``PRODUCER_OUTPUT_IS_GRAPH_OUTPUT``);
- every layer's channel count comes from its constant weight (``WEIGHT_NOT_CONSTANT``): Conv ``W.shape[0]``,
  ConvTranspose ``group · W.shape[1]``, Gemm the columns of ``B'``, MatMul ``W.shape[-1]``; they add up to BN's
  channels (``PARAM_SHAPE_MISMATCH``);
- every part meets its own rule's preconditions.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, int_attribute


class ConcatSplitRule:
    """The registry entry for ``Concat → BN`` (``--skip concat_split`` disables it).

    A Concat has no weights of its own: the driver folds into its inputs' layers, using :meth:`inputs`,
    :func:`layer_channels` and :func:`channel_ranges`; :meth:`plan` is never called for it.
    """

    name = "concat_split"
    op_type = "Concat"

    def output_rank(self, producer: ir.Node, constants: ConstantResolver) -> int | None:
        return constants.rank(producer.outputs[0], *producer.inputs)

    def plan(self, producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
        raise Skip(SkipReason.UNSUPPORTED_PRODUCER, "a Concat has no weights: its BN folds into its inputs' layers")

    def inputs(self, concat: ir.Node, constants: ConstantResolver) -> tuple[ir.Value, ...]:
        """The Concat's inputs, once the Concat is known to join distinct values on the channel axis 1."""
        axis = int_attribute(concat, "axis", 1)
        if axis < 0:
            rank = self.output_rank(concat, constants)
            if rank is None:
                raise Skip(SkipReason.RANK_UNKNOWN, f"Concat {concat.name!r} has axis {axis} and an unknown rank")
            axis += rank
        if axis != 1:
            raise Skip(SkipReason.CONCAT_AXIS_NOT_CHANNEL, f"Concat {concat.name!r} joins along axis {axis}, not 1")
        values = tuple(concat.inputs)
        if any(value is None for value in values):
            raise Skip(SkipReason.UNSUPPORTED_PRODUCER, f"Concat {concat.name!r} has an empty input")
        if len({id(value) for value in values}) != len(values):
            repeated = next(value for value in values if values.count(value) > 1)
            raise Skip(SkipReason.CONCAT_INPUT_REPEATED, f"{repeated.name!r} feeds Concat {concat.name!r} twice")
        return values


def layer_channels(layer: ir.Node, constants: ConstantResolver) -> int:
    """The number of output channels of ``layer`` (Conv, ConvTranspose, Gemm, MatMul), read from its weight."""
    weight = constants.array(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if weight is None or weight.ndim < 1:
        raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, f"the weight of {layer.op_type} {layer.name!r} is not constant")
    if layer.op_type == "ConvTranspose":
        return int_attribute(layer, "group", 1) * int(weight.shape[1]) if weight.ndim > 1 else 0
    if layer.op_type == "Gemm":
        transposed = int_attribute(layer, "transB", 0) != 0
        return int(weight.shape[0] if transposed or weight.ndim < 2 else weight.shape[1])
    if layer.op_type == "MatMul":
        return int(weight.shape[-1])
    return int(weight.shape[0])


def channel_ranges(counts: list[int], channels: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of BN's channels per Concat input; ``Skip`` unless the counts add up to ``channels``."""
    if sum(counts) != channels:
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH,
            f"the Concat's inputs have {' + '.join(map(str, counts))} = {sum(counts)} channels, BN has {channels}",
        )
    starts = [sum(counts[:index]) for index in range(len(counts))]
    return [(start, start + count) for start, count in zip(starts, counts, strict=True)]


def slice_affine(affine: Affine, start: int, stop: int) -> Affine:
    """BN's affine restricted to channels ``start .. stop − 1``."""
    return Affine(scale=affine.scale[start:stop], shift=affine.shift[start:stop])
