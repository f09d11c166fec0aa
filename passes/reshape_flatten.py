"""When a ``Reshape`` is exactly the flatten ``[N, C, d...] → [N, C·prod(d)]`` (a forward-path step).

Row-major order makes that Reshape equal to ``Flatten(axis=1)``, which a forward fold looks through (see
:mod:`~bnfold.passes.forward_path` for the math). A Reshape keeps the element count, so a 2-D result
``[y, x]`` of ``[N, d...]`` is that flatten as soon as *one* entry is proven: ``y = N`` forces
``x = prod(d)``, and ``x = prod(d)`` forces ``y = N``. The proof takes the first that applies:

1. a constant target (``constant_eval`` evaluates raw dynamo's ``Concat`` of constants) of two entries whose
   first keeps ``N`` (``0`` without ``allowzero``, or the input's static dimension 0) or whose second is
   ``prod(d)`` of the input's static shape (recorded, or by ONNX shape inference);
2. a target ``Concat(N, constant)`` whose ``N`` is ``Gather(Shape(v), 0)`` (through ``Unsqueeze``/``Cast``) or
   ``Shape(v, start=0, end=1)`` of a value ``v`` that shares the input's dimension 0 (TorchScript's
   ``x.view(x.size(0), -1)`` with a dynamic batch);
3. the recorded or inferred shapes of input and result: a 2-D result ``[.., prod(d)]`` or ``[N, ..]``.

Anything else (another rank, a target that mixes the batch with channels, unknown shapes) is
``RESHAPE_NOT_FLATTEN``: the Reshape may mix channels.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from bnfold.passes.constants import ConstantResolver
from bnfold.passes.reasons import Skip, SkipReason
from bnfold.passes.rule import int_attribute


def check_flatten(node: ir.Node, constants: ConstantResolver, batch_values: set[ir.Value]) -> None:
    """``Skip(RESHAPE_NOT_FLATTEN)`` unless Reshape ``node`` provably maps ``[N, C, d...]`` to ``[N, C·prod(d)]``.

    ``batch_values`` are values known to share the Reshape input's dimension 0 (a batch size read from them is ``N``).
    """
    where = f"Reshape {node.name!r}"
    source = constants.shape(node.inputs[0])
    target_value = node.inputs[1] if len(node.inputs) > 1 else None
    target = constants.array(target_value) if target_value is not None else None
    entries = [int(entry) for entry in target.reshape(-1)] if target is not None else None
    if entries is None and target_value is not None:
        entries = _batch_target(target_value, batch_values, constants)
    if entries is not None:
        if _target_flattens(entries, source, int_attribute(node, "allowzero", 0) != 0):
            return
        raise Skip(SkipReason.RESHAPE_NOT_FLATTEN, f"{where} reshapes {_shape_text(source)} to {entries}")
    result = constants.shape(node.outputs[0])
    if _shapes_flatten(source, result):
        return
    raise Skip(
        SkipReason.RESHAPE_NOT_FLATTEN,
        f"{where}'s target is not constant and {_shape_text(source)} → {_shape_text(result)} is not a known flatten",
    )


def _target_flattens(target: list[int], source: tuple[int | None, ...] | None, allowzero: bool) -> bool:
    """Whether Reshape to ``target`` maps ``source = [N, d...]`` to ``[N, prod(d)]``.

    Reshape keeps the element count, so ``[N, x]`` forces ``x = prod(d)`` and ``[y, prod(d)]`` forces ``y = N``:
    proving either entry is enough.
    """
    if len(target) != 2 or (source is not None and len(source) < 2):
        return False
    first, second = target
    lead = source[0] if source is not None else None
    if first == _BATCH or (first == 0 and not allowzero) or (first > 0 and lead == first):
        return True
    rest = _product(source[1:]) if source is not None else None
    if second == 0 and not allowzero:
        second = source[1] if source is not None else None
    return rest is not None and second == rest


# A Reshape target entry computed at run time as the batch size of a value on the path (see _batch_target).
_BATCH = -2


def _batch_target(target: ir.Value, batch_values: set[ir.Value], constants: ConstantResolver) -> list[int] | None:
    """The entries of a target ``Concat(batch size, constants…)``, the batch size as ``_BATCH``; else ``None``.

    TorchScript exports ``x.view(x.size(0), -1)`` with a dynamic batch as
    ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``. The batch size read from any value in ``batch_values`` (the
    Reshape's input and the values before it back to BN's input, which all keep dimension 0) is ``N``.
    """
    concat = target.producer()
    if concat is None or concat.domain not in ("", "ai.onnx") or concat.op_type != "Concat":
        return None
    entries: list[int] = []
    for piece in concat.inputs:
        array = constants.array(piece)
        if array is not None:
            entries.extend(int(entry) for entry in array.reshape(-1))
        elif _is_batch_size(piece, batch_values, constants):
            entries.append(_BATCH)
        else:
            return None
    return entries


def _is_batch_size(value: ir.Value | None, batch_values: set[ir.Value], constants: ConstantResolver) -> bool:
    """Whether ``value`` is ``[N]`` (or the scalar ``N``) read by ``Shape`` from one of ``batch_values``."""
    node = value.producer() if value is not None else None
    while node is not None and node.domain in ("", "ai.onnx") and node.op_type in ("Unsqueeze", "Cast"):
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Gather":
        index = constants.array(node.inputs[1]) if len(node.inputs) > 1 else None
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 0 or int_attribute(node, "axis", 0):
            return False
        shape = node.inputs[0].producer() if node.inputs[0] is not None else None
        end = None
    else:
        shape, end = node, 1
    if shape is None or shape.domain not in ("", "ai.onnx") or shape.op_type != "Shape":
        return False
    if int_attribute(shape, "start", 0) != 0 or (end is not None and int_attribute(shape, "end", 0) != end):
        return False
    return shape.inputs[0] in batch_values


def _shapes_flatten(source: tuple[int | None, ...] | None, result: tuple[int | None, ...] | None) -> bool:
    if source is None or result is None or len(source) < 2 or len(result) != 2:
        return False
    rest = _product(source[1:])
    return (rest is not None and result[1] == rest) or (source[0] is not None and source[0] == result[0])


def _product(dims: tuple[int | None, ...]) -> int | None:
    return None if any(dim is None for dim in dims) else math.prod(dims)


def _shape_text(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "a tensor of unknown shape"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"
