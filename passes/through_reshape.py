"""Look through a ``Reshape``/``Flatten`` that keeps the channel: ``layer [→ Add(c)] → Reshape → BN``.

Two exports put a reshape between a layer and its BN:

- LeViT's ``Linear + BatchNorm1d``: ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` is ``MatMul`` on
  ``[B, N, K]`` with a 2-D weight ``W [K, C]`` (``→ Add(bias)`` with a bias) ``→ Flatten(axis=2)`` or
  ``Reshape [B·N, C] → BN → Reshape [B, N, C]``. The channel is the MatMul's output feature, its *last* axis;
  after the reshape it is BN's axis 1.
- ``Conv [N, C, H, W] → Reshape [N, C, H·W] → BatchNorm1d`` (and ``Gemm [N, F] → Reshape [N, F, 1, 1] → BN``):
  the channel stays axis 1.

The BN is the same per-channel affine on both sides of such a reshape, so it folds into the layer as usual
(:mod:`~bnfold.passes.conv`, :mod:`~bnfold.passes.gemm`, ...). For MatMul, channel ``c`` is column ``c`` of
``W`` whatever the rank of the output (with ``s``, ``t`` from :class:`~bnfold.passes.affine.Affine`)::

    BN(reshape(A·W + b))[p, c] = (A · (W · diag(s)))[..., c] + (b[c] · s[c] + t[c])

so ``W'[:, c] = W[:, c] · s[c]`` and the shift ``b · s + t`` (``[C]``, broadcast on the last axis) goes into the
existing Add or into a new ``Add`` between the MatMul and the reshape. The reshape stays; the BN is removed
and its output name is carried by the reshape's output. The dynamo export's weight ``Transpose(W₀, perm=[1, 0])``
is folded at its source: ``W₀'[c, :] = W₀[c, :] · s[c]`` (the Transpose stays).

**Why the reshape keeps the channel.** Let the layer's output have shape ``d`` with the channel on axis ``a``
(``a = 1``; for MatMul ``a = rank − 1``), and the reshape's output ``e`` with BN's channel on axis 1. Both hold
``C`` channels (the layer's weight and BN's parameters say so). A reshape keeps the row-major element order,
so an element's flat index is ``(p·C + c)·q + r`` on both sides, with ``p`` the index over the axes before the
channel and ``q`` the product of the axes after it. The channel index ``c`` is the same on both sides exactly
when the products before the channel agree, ``∏ d[:a] = e[0]``, or — equivalently, as the element counts are
equal — the products after it agree, ``∏ d[a+1:] = ∏ e[2:]``. LeViT's case (``a`` = last axis, ``e`` 2-D)
needs only the ranks: both "after" products are empty. The products are compared symbolically: numbers
multiply, a dimension the model does not state is a symbol equal only to itself (a ``Reshape`` ``0``, which
copies an input dimension, keeps that dimension's symbol). ``e`` comes from ``Flatten``'s axis, from a
``Reshape`` target that is constant (``0`` and ``-1`` resolved), or from the output's recorded or inferred shape.

Preconditions (each failure is a named :class:`~bnfold.passes.reasons.SkipReason`):

- the reshape is ``Reshape`` or ``Flatten`` of the default domain; its output feeds only the BN and is not a
  graph output, its input is produced by a layer with a rule (or an ``Add(c)`` after one), read only by the
  reshape (the driver's checks; ``Shape`` readers are allowed, the fold keeps every shape);
- the rank of the reshape's input is known (``RANK_UNKNOWN``) and BN's input has rank >= 2 — except for
  ``MatMul → Flatten(axis=a ≥ 2)``: BN's axis 1 then holds ``∏ d[a:] = C`` channels and the MatMul's last axis
  ``d[-1] = C`` (its weight's columns), so every axis in between has size 1 and channel ``c`` is the MatMul's
  output feature ``c`` whatever the rank (TorchScript's LeViT below opset 14, where ``HardSigmoid · x`` stands for
  HardSwish and shape inference loses the rank);
- the channel is provably kept as above (``RESHAPE_MIXES_CHANNEL``); a stated channel size other than BN's
  ``C`` is ``PARAM_SHAPE_MISMATCH``;
- an ``Add`` constant varies only along the layer's channel axis (``ADDED_CONSTANT_NOT_PER_CHANNEL``);
- for MatMul: the weight is constant and 2-D (or ``Transpose(perm=[1, 0])`` of a constant read by this MatMul
  alone) (``WEIGHT_NOT_CONSTANT``, ``UNSUPPORTED_LAYOUT``), a float type (``UNSUPPORTED_DTYPE``), with ``C``
  columns (``PARAM_SHAPE_MISMATCH``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import FoldPlan, TensorUpdate, channel_count_matches, constant_input, weight_dtype

RESHAPE_OPS = frozenset({"Reshape", "Flatten"})
_MAX_RANK = 64  # a longer Reshape target is not read (no tensor has that many axes)


@dataclasses.dataclass(frozen=True)
class ChannelReshape:
    """A reshape proven to keep the channel: its node, and the rank and channel axis of its input."""

    node: ir.Node
    rank: int
    axis: int


def is_reshape(node: ir.Node) -> bool:
    return node.op_type in RESHAPE_OPS and node.domain in ("", "ai.onnx")


def layer_channel_axis(layer: ir.Node, rank: int) -> int:
    """The axis of ``layer``'s output that holds its channels: the last for MatMul, 1 for the other layers."""
    return rank - 1 if layer.op_type == "MatMul" else 1


def match_channel_reshape(
    reshape: ir.Node, layer: ir.Node, channels: int, constants: ConstantResolver
) -> ChannelReshape:
    """Prove that ``reshape`` keeps ``layer``'s channel axis as its output's axis 1, or raise ``Skip``."""
    source = reshape.inputs[0] if reshape.inputs else None
    dims = constants.shape(source)
    if dims is None:
        flatten_axis = _flatten_axis(reshape)
        if layer.op_type == "MatMul" and flatten_axis is not None and flatten_axis >= 2:
            # Any rank r > a: the rank a + 1 stands for it (the shift is a [C] vector on the last axis).
            return ChannelReshape(reshape, flatten_axis + 1, flatten_axis)
        raise Skip(SkipReason.RANK_UNKNOWN, f"the rank of {reshape.op_type} {reshape.name!r}'s input is unknown")
    rank = len(dims)
    axis = layer_channel_axis(layer, rank)
    if not 0 <= axis < rank:
        raise Skip(SkipReason.RESHAPE_MIXES_CHANNEL, f"{layer.op_type}'s output has rank {rank}")
    before = _symbols(dims, source.name)
    if isinstance(before[axis], int) and before[axis] != channels:
        raise Skip(
            SkipReason.PARAM_SHAPE_MISMATCH, f"{layer.op_type} outputs {before[axis]} channels, BN has {channels}"
        )
    before[axis] = channels
    for after in _candidate_outputs(reshape, before, constants):
        if len(after) < 2:
            raise Skip(
                SkipReason.RESHAPE_MIXES_CHANNEL, f"{reshape.op_type} {reshape.name!r} outputs rank {len(after)}"
            )
        if isinstance(after[1], int) and after[1] != channels:
            raise Skip(SkipReason.PARAM_SHAPE_MISMATCH, f"BN input has {after[1]} channels, BN has {channels}")
        after = [after[0], channels, *after[2:]]
        if _product(before[:axis]) == _product(after[:1]) or _product(before[axis + 1 :]) == _product(after[2:]):
            return ChannelReshape(reshape, rank, axis)
    raise Skip(
        SkipReason.RESHAPE_MIXES_CHANNEL,
        f"{reshape.op_type} {reshape.name!r} does not provably keep axis {axis} of {layer.op_type}'s output "
        "as the channel axis 1",
    )


def _flatten_axis(reshape: ir.Node) -> int | None:
    """The non-negative ``axis`` of a ``Flatten`` (``None`` for a Reshape, a negative axis or a reference)."""
    if reshape.op_type != "Flatten":
        return None
    attribute = reshape.attributes.get("axis")
    if attribute is not None and attribute.is_ref():
        return None
    axis = 1 if attribute is None else int(attribute.as_int())
    return axis if axis >= 0 else None


def per_axis_vector(constant: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray:
    """``constant`` as a float64 ``[C]`` vector along ``axis`` of a rank-``rank`` tensor, or ``Skip``."""
    aligned = (1,) * (rank - constant.ndim) + constant.shape
    if constant.ndim > rank or any(size != 1 for index, size in enumerate(aligned) if index != axis):
        raise Skip(
            SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL,
            f"added constant of shape {constant.shape} varies along an axis other than the channel axis {axis}",
        )
    if aligned[axis] not in (1, channels):
        raise Skip(SkipReason.PARAM_SHAPE_MISMATCH, f"added constant has {aligned[axis]} channels, BN has {channels}")
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()


def plan_matmul_columns(producer: ir.Node, affine: Affine, constants: ConstantResolver) -> FoldPlan:
    """MatMul's plan when its channel is the last axis of an output of any rank: ``W'[:, c] = W[:, c]·s[c]``."""
    transpose = _transposed_weight(producer, constants)
    if transpose is not None:
        source = transpose.inputs[0]
        weight = constants.array(source)
        dtype = weight_dtype(source, weight)
        channel_count_matches(affine, weight.shape[0], producer)
        update = TensorUpdate(transpose, 0, weight, dtype, source.name, row_scale=affine.scale.reshape(-1, 1))
    else:
        weight = constant_input(producer, 1, constants, SkipReason.WEIGHT_NOT_CONSTANT)
        if weight is None:
            raise Skip(SkipReason.WEIGHT_NOT_CONSTANT, "MatMul has no second input")
        dtype = weight_dtype(producer.inputs[1], weight)
        if weight.ndim != 2:
            raise Skip(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul weight has rank {weight.ndim}, expected 2")
        channel_count_matches(affine, weight.shape[1], producer)
        update = TensorUpdate(producer, 1, weight, dtype, producer.inputs[1].name, row_scale=affine.scale)
    return FoldPlan(updates=(update,), residual_shift=affine.shift, residual_dtype=dtype)


def _transposed_weight(producer: ir.Node, constants: ConstantResolver) -> ir.Node | None:
    """The ``Transpose(W₀, perm=[1, 0])`` giving MatMul its weight, when ``W₀`` is a 2-D constant read through
    this Transpose by this MatMul alone (torch's dynamo export of ``Linear`` on a 3-D input)."""
    weight = producer.inputs[1] if len(producer.inputs) > 1 else None
    transpose = weight.producer() if weight is not None else None
    if transpose is None or transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx"):
        return None
    perm = transpose.attributes.get("perm")
    if perm is None or perm.is_ref() or list(perm.as_ints()) != [1, 0] or transpose.graph is not producer.graph:
        return None
    if weight.is_graph_output() or [(use.node, use.idx) for use in weight.uses()] != [(producer, 1)]:
        return None
    source = constants.array(transpose.inputs[0])
    return transpose if source is not None and source.ndim == 2 else None


# -- symbolic shapes -----------------------------------------------------------------------------------------

Dim = int | str | tuple  # a number, a symbol that equals only itself, or a tuple of factors (their product)


def _symbols(dims: tuple[int | None, ...], name: str | None) -> list[Dim]:
    """``dims`` with every unknown dimension replaced by a symbol unique to this value and axis."""
    return [dim if isinstance(dim, int) else f"{name}[{axis}]" for axis, dim in enumerate(dims)]


def _product(dims: list[Dim]) -> tuple[int, tuple[str, ...]]:
    """The product of ``dims`` as (number, sorted symbols); two products are equal when these are."""
    number, symbols = 1, []
    for dim in dims:
        if isinstance(dim, tuple):
            inner_number, inner_symbols = _product(list(dim))
            number *= inner_number
            symbols.extend(inner_symbols)
        elif isinstance(dim, int):
            number *= dim
        else:
            symbols.append(dim)
    return number, tuple(sorted(symbols))


def _candidate_outputs(reshape: ir.Node, before: list[Dim], constants: ConstantResolver) -> list[list[Dim]]:
    """Descriptions of the reshape's output shape, each sound on its own (from its attributes/target, and from
    its recorded or inferred shape); the caller tries each."""
    candidates = []
    if reshape.op_type == "Flatten":
        axis = _int_attribute(reshape, "axis", 1)
        axis = axis + len(before) if axis < 0 else axis
        if not 0 <= axis <= len(before):
            return []
        candidates.append([_merged(before[:axis]), _merged(before[axis:])])
    else:
        target = constants.array(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
        if target is not None and target.ndim == 1 and target.dtype.kind in "iu" and target.size <= _MAX_RANK:
            allowzero = _int_attribute(reshape, "allowzero", 0)
            resolved = _resolve_target([int(v) for v in target], before, allowzero, f"{reshape.outputs[0].name}[-1]")
            if resolved is not None:
                candidates.append(resolved)
    output = reshape.outputs[0]
    recorded = constants.shape(output)
    if recorded is not None:
        candidates.append(_symbols(recorded, output.name))
    return candidates


def _resolve_target(target: list[int], before: list[Dim], allowzero: int, unknown: str) -> list[Dim] | None:
    """Reshape's output from a constant target: ``0`` copies the input's dimension (unless ``allowzero``), one
    ``-1`` takes what is left of the element count."""
    after: list[Dim | None] = []
    for index, size in enumerate(target):
        if size == 0 and not allowzero:
            if index >= len(before):
                return None
            after.append(before[index])
        elif size >= 0:
            after.append(size)
        elif size == -1:
            after.append(None)
        else:
            return None
    if after.count(None) > 1:
        return None
    if None in after:
        index = after.index(None)
        after[index] = _quotient(before, [dim for dim in after if dim is not None], unknown)
    return after


def _quotient(total: list[Dim], known: list[Dim], unknown: str) -> Dim:
    """``∏ total / ∏ known`` when the symbols and numbers divide exactly, else the fresh symbol ``unknown``."""
    (total_number, total_symbols), (known_number, known_symbols) = _product(total), _product(known)
    left = Counter(total_symbols)
    left.subtract(Counter(known_symbols))
    if any(count < 0 for count in left.values()) or known_number == 0 or total_number % known_number:
        return unknown
    symbols = list(left.elements())
    number = total_number // known_number
    return (number, *symbols) if symbols else number


def _merged(dims: list[Dim]) -> Dim:
    """One dimension equal to the product of ``dims``: a number when they all are, else their factors."""
    number, symbols = _product(dims)
    return number if not symbols else tuple(dims)


def _int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None or attribute.is_ref() else int(attribute.as_int())
