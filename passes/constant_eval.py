"""A small, bounded evaluator for parameters that exporters compute from constants at run time.

torch's raw dynamo export (``torch.onnx.export(..., dynamo=True, optimize=False)``) gives every bias-less Conv
a bias that is computed when the model runs, although it is a constant::

    shape = Expand(Shape(W, start=0, end=1), [1])        # [M], from W's recorded shape
    zero  = CastLike(Constant(0.0), X)                   # X is the runtime input: only its dtype matters
    bias  = Expand(zero, shape)                          # [M] zeros, Conv input 2

This module evaluates such chains so that a rule sees the value. It is **not** a constant-folding pass: the
graph is never changed here (the fold replaces the tensor it rewrites, and
:meth:`~bnfold.passes.graph_edit.TensorWriter.prune_orphans` removes the chain once nothing reads it), and only
the ops below are evaluated; any other op — and any input that is not itself constant — leaves the value
"not constant".

=================  ================================================================================
op                 evaluated when
=================  ================================================================================
Constant           ``value`` (dense), ``value_float(s)``, ``value_int(s)``; no function-attribute reference
Identity           the input is constant
Shape              the input is constant, or every selected dimension of its shape — recorded, else from ONNX
                   shape inference — is a number, also for a runtime value (``start``/``end`` with negative
                   indices and clamping as in opset 15)
Transpose          the input is constant; ``perm`` a permutation of its axes (default: reversed axes)
Cast, CastLike     the input is constant and the target (``to``, or input 1's element type, which may be a
                   runtime value: only its type is read) is a bool, integer, float16/bfloat16/32/64 type
Reshape            data and shape constant; ``0`` copies the input dimension unless ``allowzero=1``, one
                   ``-1`` is inferred; anything invalid is not constant
Unsqueeze/Squeeze  data constant; ``axes`` as attribute (opset < 13) or constant input (opset >= 13);
                   Squeeze without axes drops every dimension of size 1
Concat             every input constant, one dtype, one rank
Expand             data and shape constant, bidirectional broadcast as in numpy
ConstantOfShape    shape constant, non-negative; fill is a one-element tensor (default float32 0)
=================  ================================================================================

Bounds (no gigabytes from a few bytes): a result that creates data (Expand, ConstantOfShape, Concat, Cast,
CastLike) holds at most :data:`MAX_RESULT_ELEMENTS` (2**24) elements, and one resolver creates at most
:data:`MAX_TOTAL_ELEMENTS` (2**26) elements in all; Reshape, Squeeze, Unsqueeze and Identity return views of
their input and create nothing, and so does Transpose (a strided view). The caller bounds the depth of a chain (see
:class:`~bnfold.passes.constants.ConstantResolver`). Past a bound, the value is "not constant".
Results are shared and read-only: a caller must not write into them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx_ir as ir

#: Elements one evaluated result that creates data may hold (float64: 128 MiB).
MAX_RESULT_ELEMENTS = 1 << 24
#: Elements all evaluated results of one resolver may create together.
MAX_TOTAL_ELEMENTS = 1 << 26

#: Element types Cast and CastLike evaluate to (float8, int4, strings and complex stay not constant).
CASTABLE_DTYPES = frozenset(
    {
        ir.DataType.BOOL,
        *(ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64),
        *(ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64),
        *(ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE),
    }
)


class ElementBudget:
    """Counts the elements evaluated results create; refuses a result past either bound."""

    def __init__(self, per_result: int = MAX_RESULT_ELEMENTS, total: int = MAX_TOTAL_ELEMENTS) -> None:
        self.per_result = per_result
        self.remaining = total

    def take(self, elements: int) -> bool:
        if elements > self.per_result or elements > self.remaining:
            return False
        self.remaining -= elements
        return True


class ValueSource(Protocol):
    """What a kernel needs from its caller: the constant data and element type of an input, and a budget."""

    budget: ElementBudget

    def array(self, value: ir.Value | None) -> np.ndarray | None: ...

    def dtype(self, *values: ir.Value | None) -> ir.DataType | None: ...

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None: ...


Kernel = Callable[[ir.Node, ValueSource], "np.ndarray | None"]


def is_evaluable(node: ir.Node) -> bool:
    """Whether ``node`` is an op this module evaluates (its inputs may still turn out not constant)."""
    return node.domain in ("", "ai.onnx") and node.op_type in KERNELS


def evaluate(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    """The value of ``node``'s single output, or ``None`` when it is not a compile-time constant."""
    if not is_evaluable(node) or len(node.outputs) != 1:
        return None
    if any(attribute.is_ref() for attribute in node.attributes.values()):
        return None  # a function attribute: its value is only known per call site
    try:
        return KERNELS[node.op_type](node, source)
    except (ValueError, TypeError, OverflowError):  # an invalid model: the op would fail at run time too
        return None


# -- attribute and input helpers ------------------------------------------------------------------------------


def _int(node: ir.Node, name: str, default: int | None) -> int | None:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.as_int())


def _input(node: ir.Node, index: int, source: ValueSource) -> np.ndarray | None:
    return source.array(node.inputs[index]) if index < len(node.inputs) else None


def _int_vector(array: np.ndarray | None) -> tuple[int, ...] | None:
    """A 1-D integer tensor as a tuple of ints, else ``None``."""
    if array is None or array.ndim != 1 or array.dtype.kind not in "iu":
        return None
    return tuple(int(x) for x in array)


def _axes(node: ir.Node, source: ValueSource) -> tuple[int, ...] | bool:
    """``axes`` from the attribute (old opsets) or input 1 (new opsets); ``()`` when absent; ``False`` when
    given at run time."""
    attribute = node.attributes.get("axes")
    if attribute is not None:
        return tuple(int(axis) for axis in attribute.as_ints())
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return ()
    axes = _int_vector(source.array(node.inputs[1]))
    return False if axes is None else axes


def _normalised(axes: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    result = tuple(axis + rank if axis < 0 else axis for axis in axes)
    if any(not 0 <= axis < rank for axis in result) or len(set(result)) != len(result):
        return None
    return result


def _created(array: np.ndarray, source: ValueSource) -> np.ndarray | None:
    """``array`` (newly created data) if the budget allows it."""
    return array if source.budget.take(array.size) else None


# -- kernels ---------------------------------------------------------------------------------------------------


def constant_node_array(node: ir.Node, source: ValueSource | None = None) -> np.ndarray | None:
    """The tensor of a ``Constant`` node (dense forms only)."""
    attributes = node.attributes
    if any(attribute.is_ref() for attribute in attributes.values()):
        return None
    if "value" in attributes:  # (``.value``, not ``as_tensor()``: its protocol check costs ~30× more)
        value = attributes["value"]
        return value.value.numpy() if value.type == ir.AttributeType.TENSOR else None
    if "value_float" in attributes:
        return np.array(attributes["value_float"].as_float(), dtype=np.float32)
    if "value_floats" in attributes:
        return np.array(list(attributes["value_floats"].as_floats()), dtype=np.float32)
    if "value_int" in attributes:
        return np.array(attributes["value_int"].as_int(), dtype=np.int64)
    if "value_ints" in attributes:
        return np.array(list(attributes["value_ints"].as_ints()), dtype=np.int64)
    return None


def _identity(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    return _input(node, 0, source)


def _shape(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    """``Shape`` needs only the input's dimensions: a runtime value (raw dynamo's ``Shape(conv_out, 1, 2)``, the
    channel count of a BN's computed scale) qualifies when the dimensions selected are numbers."""
    if not node.inputs or node.inputs[0] is None:
        return None
    value = node.inputs[0]
    dims: list[int | None] | None = None
    shape = source.shape(value)  # recorded, else inferred; ``None`` per dimension that is not a number
    start, end = _int(node, "start", 0), _int(node, "end", None)
    if shape is not None:
        dims = list(shape)[_slice(start, end, len(shape))]
    if dims is None or not all(isinstance(dim, int) for dim in dims):
        data = source.array(value)
        if data is None:
            return None
        dims = list(data.shape)[_slice(start, end, data.ndim)]
    return np.array(dims, dtype=np.int64)


def _slice(start: int, end: int | None, rank: int) -> slice:
    """Shape's ``start``/``end``: negative counts from the back, both clamped to ``[0, rank]``."""
    end = rank if end is None else end
    start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
    return slice(start, end)


def _cast_to(array: np.ndarray | None, dtype: ir.DataType | None, source: ValueSource) -> np.ndarray | None:
    if array is None or dtype not in CASTABLE_DTYPES:
        return None
    if ir.DataType.from_numpy(array.dtype) not in CASTABLE_DTYPES or not source.budget.take(array.size):
        return None
    with np.errstate(all="ignore"):  # out-of-range float→int is undefined in ONNX too; numpy warns
        return np.asarray(array).astype(dtype.numpy())


def _cast(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    to = _int(node, "to", None)
    if to is None or to not in {dtype.value for dtype in CASTABLE_DTYPES}:
        return None
    return _cast_to(_input(node, 0, source), ir.DataType(to), source)


def _cast_like(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    # Input 1 is usually a runtime tensor (the Conv's input in dynamo exports): only its element type counts.
    return _cast_to(_input(node, 0, source), source.dtype(node.inputs[1]), source)


def _reshape(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    data, shape = _input(node, 0, source), _int_vector(_input(node, 1, source))
    if data is None or shape is None:
        return None
    allowzero = _int(node, "allowzero", 0)
    if allowzero and 0 in shape and -1 in shape:
        return None  # invalid per the spec
    dims = list(shape)
    for i, dim in enumerate(shape):
        if dim == 0 and not allowzero:
            if i >= data.ndim:
                return None
            dims[i] = data.shape[i]
        elif dim < -1:
            return None
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        known = math.prod(dim for dim in dims if dim != -1)
        if known == 0 or data.size % known:
            return None
        dims[dims.index(-1)] = data.size // known
    if math.prod(dims) != data.size:
        return None
    return data.reshape(dims)


def _unsqueeze(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    data, axes = _input(node, 0, source), _axes(node, source)
    if data is None or not axes:  # axes are required
        return None
    normalised = _normalised(axes, data.ndim + len(axes))
    return None if normalised is None else np.expand_dims(data, normalised)


def _squeeze(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    data, axes = _input(node, 0, source), _axes(node, source)
    if data is None or axes is False:
        return None
    if not axes:
        return np.squeeze(data)
    normalised = _normalised(axes, data.ndim)
    if normalised is None or any(data.shape[axis] != 1 for axis in normalised):
        return None
    return np.squeeze(data, axis=normalised)


def _concat(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    axis = _int(node, "axis", None)
    parts = [source.array(value) for value in node.inputs]
    if axis is None or not parts or any(part is None for part in parts):
        return None
    if len({part.dtype for part in parts}) != 1 or len({part.ndim for part in parts}) != 1:
        return None
    rank = parts[0].ndim
    if not -rank <= axis < rank:
        return None
    if not source.budget.take(sum(part.size for part in parts)):
        return None
    return np.concatenate(parts, axis=axis)


def _expand(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    data, shape = _input(node, 0, source), _int_vector(_input(node, 1, source))
    if data is None or shape is None or any(dim < 0 for dim in shape):
        return None
    target = np.broadcast_shapes(data.shape, shape)  # ValueError when incompatible
    if not source.budget.take(math.prod(target)):
        return None
    return np.broadcast_to(data, target).copy()  # C order (np.array would keep the zero strides' layout)


def _constant_of_shape(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    shape = _int_vector(_input(node, 0, source))
    if shape is None or any(dim < 0 for dim in shape):
        return None
    fill = node.attributes.get("value")
    if fill is not None and fill.type != ir.AttributeType.TENSOR:
        return None
    fill_array = fill.value.numpy().reshape(-1) if fill is not None else np.zeros(1, np.float32)
    if fill_array.size != 1 or not source.budget.take(math.prod(shape)):
        return None
    return np.full(shape, fill_array[0], dtype=fill_array.dtype)


def _transpose(node: ir.Node, source: ValueSource) -> np.ndarray | None:
    """A legacy export without constant folding writes a bias-less ``Linear`` as ``MatMul(X, Transpose(W))``."""
    data = _input(node, 0, source)
    if data is None:
        return None
    attribute = node.attributes.get("perm")
    if attribute is None:
        return np.transpose(data)  # reversed axes
    perm = tuple(int(axis) for axis in attribute.as_ints())
    if sorted(perm) != list(range(data.ndim)):
        return None  # not a permutation of the input's axes: invalid
    return np.transpose(data, perm)


KERNELS: dict[str, Kernel] = {
    "Constant": constant_node_array,
    "Identity": _identity,
    "Shape": _shape,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Transpose": _transpose,
}
