"""Input batches for verification: generated from the model's input types, or loaded from ``.npz``.

Generation is seeded and deterministic (one ``numpy.random.Generator`` per ``seed``, inputs in graph order):

- floating inputs (float16/32/64, bfloat16): standard normal values, cast once to the element type;
- integer inputs: uniform in ``[0, 4)`` (small, so that index-like inputs stay in range);
- bool inputs: fair coin flips;
- anything else (strings, complex, float8): cannot be generated; pass ``load_inputs``.

Shapes: fixed dims are used as they are; ``input_shapes[name]`` replaces a whole shape; ``dims[dim_param]``
pins a symbolic dim everywhere it appears. Every other dynamic dim is exercised with two sizes, alternating
between iterations: :data:`LEADING_DIM_SIZES` for axis 0 (the batch) and :data:`OTHER_DIM_SIZES` elsewhere.
Dims sharing one ``dim_param`` always get the same size.

``.npz`` layout: ``"<iteration>/<input name>"`` per array (e.g. ``"0/x"``, ``"1/x"``); a file whose keys are
exactly the input names holds a single iteration. bfloat16 arrays are stored as their uint16 bit patterns
(numpy cannot store bfloat16) and turned back into bfloat16 when the model's input is bfloat16.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from bnfold.errors import UsageError
from bnfold.files.inputs import Declared, read_npz, shown_path

# Input batches a verification compares by default (dynamic dims alternate between two sizes across them).
DEFAULT_ITERATIONS = 3
LEADING_DIM_SIZES = (1, 2)
OTHER_DIM_SIZES = (32, 24)
INTEGER_RANGE = (0, 4)
# Generated inputs larger than this (per input, per batch: 1 GiB of float32) are refused, not allocated.
MAX_GENERATED_ELEMENTS = 2**28

Dim = int | str | None  # a fixed size, a dim_param, or an anonymous dynamic dim
Batch = dict[str, np.ndarray]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input that must be fed: its name, element type name and declared dims (``None``: rank unknown)."""

    name: str
    dtype: str
    dims: tuple[Dim, ...] | None

    @property
    def generatable(self) -> bool:
        return self.dtype in _FLOATING or self.dtype in _INTEGER or self.dtype == "bool"


_FLOATING = {"float16", "float32", "float64", "bfloat16"}
_INTEGER = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def input_specs(proto: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The inputs that must be fed, in graph order (inputs backed by an initializer are optional and left out)."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    specs = []
    for value_info in proto.graph.input:
        if value_info.name in initializers:
            continue
        value_type = value_info.type
        if value_type.WhichOneof("value") != "tensor_type":
            specs.append(InputSpec(value_info.name, f"non-tensor ({value_type.WhichOneof('value')})", None))
            continue
        tensor_type = value_type.tensor_type
        specs.append(InputSpec(value_info.name, _dtype_name(tensor_type.elem_type), _dims(tensor_type)))
    return tuple(specs)


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(ir.DataType(elem_type).numpy()).name if elem_type != onnx.TensorProto.STRING else "str"
    except (ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"


def _dims(tensor_type: onnx.TypeProto.Tensor) -> tuple[Dim, ...] | None:
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))  # some exporters (paddle2onnx) write -1 for "dynamic": treat as unknown
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def symbolic_dims(specs: Sequence[InputSpec]) -> set[str]:
    return {dim for spec in specs for dim in (spec.dims or ()) if isinstance(dim, str)}


def check_shape_options(
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, Sequence[int]] | None,
    dims: Mapping[str, int] | None,
) -> None:
    """Raise :class:`UsageError` for unknown names, bad sizes or shapes contradicting fixed dims."""
    by_name = {spec.name: spec for spec in specs}
    for name, shape in (input_shapes or {}).items():
        spec = by_name.get(name)
        if spec is None:
            raise UsageError(f"--input-shapes names {name!r}, not an input of the model (inputs: {_names(specs)})")
        if any(not isinstance(size, int) or size < 0 for size in shape):
            raise UsageError(f"--input-shapes {name}: sizes must be integers >= 0, got {list(shape)}")
        if spec.dims is not None:
            if len(shape) != len(spec.dims):
                raise UsageError(
                    f"--input-shapes {name}: rank {len(shape)} but the model declares rank {len(spec.dims)} "
                    f"{_shape_text(spec.dims)}"
                )
            for axis, (size, dim) in enumerate(zip(shape, spec.dims, strict=True)):
                if isinstance(dim, int) and dim != size:
                    raise UsageError(f"--input-shapes {name}: axis {axis} is fixed to {dim} by the model, got {size}")
    known = symbolic_dims(specs)
    for param, size in (dims or {}).items():
        if param not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise UsageError(f"--dim {param}: the model has no such symbolic dim (symbolic dims: {listed})")
        if not isinstance(size, int) or size < 0:
            raise UsageError(f"--dim {param}: size must be an integer >= 0, got {size!r}")


def resolve_shapes(
    specs: Sequence[InputSpec],
    iteration: int,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input for ``iteration`` (see module docstring for the rules)."""
    input_shapes, dims = input_shapes or {}, dict(dims or {})
    variant = iteration % 2
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in input_shapes:
            shapes[spec.name] = tuple(int(size) for size in input_shapes[spec.name])
            continue
        if spec.dims is None:
            raise UsageError(f"input {spec.name!r} has no declared shape; give it with --input-shapes {spec.name}:...")
        shape = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            size = (LEADING_DIM_SIZES if axis == 0 else OTHER_DIM_SIZES)[variant]
            if isinstance(dim, str):
                size = dims.setdefault(dim, size)
            shape.append(size)
        shapes[spec.name] = tuple(shape)
    return shapes


def generate_inputs(
    specs: Sequence[InputSpec],
    *,
    seed: int = 0,
    iterations: int = 3,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> list[Batch]:
    """``iterations`` seeded input batches for ``specs``."""
    if iterations < 1:
        raise UsageError(f"iterations must be >= 1, got {iterations}")
    for spec in specs:
        if not spec.generatable:
            raise UsageError(
                f"input {spec.name!r} has element type {spec.dtype}, which bnfold cannot generate; "
                "pass the inputs with --load-inputs FILE.npz"
            )
    check_shape_options(specs, input_shapes, dims)
    rng = np.random.default_rng(seed)
    batches = []
    for iteration in range(iterations):
        shapes = resolve_shapes(specs, iteration, input_shapes, dims)
        _check_generated_size(shapes)
        batches.append({spec.name: _random_array(rng, spec.dtype, shapes[spec.name]) for spec in specs})
    return batches


def _check_generated_size(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse to generate inputs a model declares absurdly large, before allocating anything."""
    for name, shape in shapes.items():
        elements = math.prod(shape)
        if elements > MAX_GENERATED_ELEMENTS:
            raise UsageError(
                f"input {name!r} would have shape {list(shape)} ({elements:.3g} elements, more than "
                f"{MAX_GENERATED_ELEMENTS:.3g}); give a smaller one with --input-shapes {name}:... "
                "or pass inputs with --load-inputs FILE.npz"
            )


def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype in _FLOATING:
        return rng.standard_normal(shape).astype(_numpy_dtype(dtype))
    if dtype in _INTEGER:
        return rng.integers(*INTEGER_RANGE, size=shape).astype(dtype)
    return rng.random(shape) < 0.5


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def save_inputs(path: str | os.PathLike, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write ``batches`` to ``path`` as ``.npz`` (``"<iteration>/<name>"`` keys; bfloat16 as uint16 bits)."""
    arrays = {}
    for iteration, batch in enumerate(batches):
        for name, array in batch.items():
            if array.dtype == ml_dtypes.bfloat16:
                array = array.view(np.uint16)
            arrays[f"{iteration}/{name}"] = array
    try:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as error:
        raise UsageError(f"--save-inputs {path}: cannot write ({error.strerror or error})") from error


LOAD_INPUTS_FLAG = "--load-inputs"


def load_inputs(path: str | os.PathLike, specs: Sequence[InputSpec]) -> list[Batch]:
    """Read batches saved by :func:`save_inputs` (or one batch keyed by input names) and check them.

    Raises :class:`UsageError` for a missing, unreadable or non-regular file (a FIFO is never opened for
    reading), missing or unknown inputs, a wrong element type or a shape that contradicts the model's fixed
    dims. The keys, dtypes and shapes are checked on the ``.npy`` headers before any array data is read (see
    :func:`bnfold.files.inputs.read_npz`: declared sizes are capped, pickles refused, big-endian arrays
    converted to native byte order).
    """
    where = f"{LOAD_INPUTS_FLAG} {shown_path(path)}"
    stored = read_npz(path, LOAD_INPUTS_FLAG, lambda members: _check_declared(where, specs, members))
    batches = [
        {spec.name: _as_input(spec, batch[spec.name]) for spec in specs}
        for _, batch in sorted(_batches_of(where, stored, specs).items())
    ]
    if not batches:
        raise UsageError(f"{where}: the file holds no arrays")
    return batches


def _batches_of(where: str, stored: Mapping[str, T], specs: Sequence[InputSpec]) -> dict[int, dict[str, T]]:
    """Iteration → {input name: value} for the keys of a file; UsageError for bad keys or missing inputs."""
    names = [spec.name for spec in specs]
    grouped = {0: dict(stored)} if set(stored) == set(names) else _group_by_iteration(where, stored, names)
    for iteration, batch in grouped.items():
        missing = [name for name in names if name not in batch]
        if missing:
            raise UsageError(f"{where}: iteration {iteration} lacks input(s) {', '.join(missing)}")
    return grouped


def _group_by_iteration(where: str, stored: Mapping[str, T], names: Sequence[str]) -> dict[int, dict[str, T]]:
    grouped: dict[int, dict[str, T]] = {}
    for key, array in stored.items():
        prefix, _, name = key.partition("/")
        if not prefix.isdigit() or name not in names:
            raise UsageError(
                f"{where}: key {key!r} is neither an input name nor '<iteration>/<input name>' "
                f"(inputs: {', '.join(names)})"
            )
        grouped.setdefault(int(prefix), {})[name] = array
    return grouped


def _check_declared(where: str, specs: Sequence[InputSpec], members: Mapping[str, Declared]) -> None:
    """Keys, element types and shapes from the ``.npy`` headers, before any data is read."""
    by_name = {spec.name: spec for spec in specs}
    for batch in _batches_of(where, members, specs).values():
        for name, (shape, dtype) in batch.items():
            _check_array(where, by_name[name], shape, dtype)


def _check_array(where: str, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype) -> None:
    actual = "str" if dtype.kind == "U" else dtype.name
    if spec.dtype == "bfloat16" and (actual == "uint16" or dtype == np.dtype("V2")):
        actual = "bfloat16"  # stored as its bit patterns (numpy cannot store bfloat16)
    if actual != spec.dtype:
        raise UsageError(f"{where}: input {spec.name!r} must be {spec.dtype}, the file holds {actual}")
    if spec.dims is not None:
        if len(shape) != len(spec.dims):
            raise UsageError(
                f"{where}: input {spec.name!r} has shape {list(shape)}, the model declares {_shape_text(spec.dims)}"
            )
        for axis, (size, dim) in enumerate(zip(shape, spec.dims, strict=True)):
            if isinstance(dim, int) and size != dim:
                raise UsageError(f"{where}: input {spec.name!r} axis {axis} is {size}, the model fixes it to {dim}")


def _as_input(spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """The array as the model takes it: bfloat16 bit patterns viewed as bfloat16."""
    if spec.dtype == "bfloat16" and array.dtype in (np.uint16, np.dtype("V2")):
        return array.view(ml_dtypes.bfloat16)
    return array


def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(spec.name for spec in specs) or "none"


def _shape_text(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in dims) + "]"
