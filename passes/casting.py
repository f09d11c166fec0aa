"""The checked cast every planned tensor goes through, and the large folded weight computed when it is read.

The driver casts each float64 tensor a rule planned exactly once (:func:`cast_checked`), before it changes the
graph, so an overflow in one tensor leaves the whole graph untouched. A planned ``values · row_scale`` product
(:attr:`~bnfold.passes.rule.TensorUpdate.row_scale`) is computed in blocks so its float64 form never exists
whole; a large one becomes a :class:`ScaledWeight`, whose range is checked now and whose product is computed
when a writer reads it (in parallel threads of one shared pool, re-created after ``fork``).

Everything here is bit-identical to ``np.multiply(values, row_scale, dtype=np.float64).astype(dtype)``: the
same float64 multiply per element and one cast.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold.passes.reasons import Skip, SkipReason

# Bytes of float64 work per block of a blocked product: fits in L2 with its source and destination rows.
BLOCK_BYTES = 1 << 20
# Bytes of cast result per block a writer streams (:meth:`ScaledWeight.blocks`).
STREAM_BLOCK_BYTES = 8 << 20
# Planned weights at least this large are computed when they are read (:class:`ScaledWeight`), not when planned.
DEFERRED_BYTES = 4 << 20
# Source dtypes the deferred path reduces with numpy's own max/min (others take the immediate path).
_NATIVE_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def cast_checked(
    values: np.ndarray, dtype: ir.DataType, what: str, row_scale: np.ndarray | None = None
) -> np.ndarray | ScaledWeight:
    """Cast float64 ``values`` (or the float64 product ``values · row_scale``) to ``dtype`` once.

    Raises ``Skip`` if any value is non-finite or beyond the dtype's range. Two read-only reductions
    (``max``, ``min``; NaN propagates through both) replace ``isfinite`` + ``abs``, which each wrote a
    temporary as large as ``values``. With ``row_scale``, see :func:`cast_scaled_checked`.
    """
    if row_scale is not None:
        return cast_scaled_checked(values, row_scale, dtype, what)
    high, low = _extremes(values)
    _check_range(high, low, dtype, what)
    return values.astype(dtype.numpy())


#: Up to this many elements, :func:`_extremes` compares Python floats (numpy's fixed cost per call dominates).
_SCALAR_EXTREMES = 32


def _extremes(values: np.ndarray) -> tuple[float, float]:
    """``(max, min)`` of ``values`` (NaN when one is NaN; ``(0, 0)`` when empty)."""
    if not values.size:
        return 0.0, 0.0
    if values.size <= _SCALAR_EXTREMES:  # (a bias): a finite sum means no NaN/∞, which Python's max/min drop
        items = values.ravel().tolist()
        if math.isfinite(sum(items)):
            return float(max(items)), float(min(items))
    return float(values.max()), float(values.min())


def cast_scaled_checked(
    values: np.ndarray, row_scale: np.ndarray, dtype: ir.DataType, what: str
) -> np.ndarray | ScaledWeight:
    """``(values · row_scale).astype(dtype)`` with the range checks of :func:`cast_checked`, computed blockwise.

    Every element goes through the same float64 multiply and the same single cast as
    ``np.multiply(values, row_scale, dtype=np.float64).astype(dtype)``: the result is bit-identical.
    ``row_scale`` broadcasts onto ``values``; a ``row_scale`` of full rank with a leading dimension other than 1
    is sliced along with the rows.

    A weight of at least ``DEFERRED_BYTES`` is returned as a :class:`ScaledWeight`: its range is checked now,
    exactly, from per-scale maxima and minima of ``values`` (:func:`product_range`), and the product is
    computed when the weight is read or written. Smaller ones are computed now, in blocks of leading-axis rows
    (about ``BLOCK_BYTES`` of float64 each) so the float64 product never exists whole.
    """
    if values.size * 8 <= BLOCK_BYTES or np.broadcast_shapes(values.shape, row_scale.shape) != values.shape:
        return cast_checked(np.multiply(values, row_scale, dtype=np.float64), dtype, what)
    if values.nbytes >= DEFERRED_BYTES and values.dtype in _NATIVE_FLOATS:
        _check_range(*product_range(values, row_scale), dtype, what)
        return ScaledWeight(values, row_scale, dtype.numpy())
    row_bytes = 8 * (values.size // values.shape[0])
    rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    slice_scale = row_scale.ndim == values.ndim and row_scale.shape[0] != 1
    result = np.empty(values.shape, dtype=dtype.numpy())
    buffer = np.empty((min(rows, values.shape[0]), *values.shape[1:]), dtype=np.float64)
    limit = _finfo_max(dtype)
    high, low = -np.inf, np.inf
    for start in range(0, values.shape[0], rows):
        stop = min(start + rows, values.shape[0])
        block = buffer[: stop - start]
        np.copyto(block, values[start:stop])  # (widening is exact; then one float64 multiply in place)
        np.multiply(block, row_scale[start:stop] if slice_scale else row_scale, out=block)
        block_high, block_low = float(block.max()), float(block.min())
        if np.isnan(block_high) or np.isnan(block_low):
            high = low = float("nan")  # (Python's max/min would drop a NaN)
            break
        high, low = max(high, block_high), min(low, block_low)
        if max(high, -low) <= limit:  # past the limit: only the range is still needed (for the message)
            np.copyto(result[start:stop], block, casting="unsafe")
    _check_range(high, low, dtype, what)
    return result


def product_range(values: np.ndarray, row_scale: np.ndarray) -> tuple[float, float]:
    """The largest and smallest float64 product ``values · row_scale``, exactly, without forming the products.

    Rounding is monotone: for a fixed scale ``s``, ``x ↦ fl(x·s)`` never decreases (``s ≥ 0``) or never
    increases (``s < 0``), so among the elements that share one scale the extreme products are
    ``fl(max(x)·s)`` and ``fl(min(x)·s)``. The elements sharing a scale are those along the axes where
    ``row_scale`` broadcasts. NaN (in ``values``, or from ``inf · 0``) propagates into both results, as it
    does through the elementwise product.
    """
    scale = row_scale.reshape((1,) * (values.ndim - row_scale.ndim) + row_scale.shape)
    shared = tuple(axis for axis in range(values.ndim) if scale.shape[axis] == 1)
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN and inf are reported by the caller)
        candidates = (
            np.multiply(values.max(axis=shared, keepdims=True), scale, dtype=np.float64),
            np.multiply(values.min(axis=shared, keepdims=True), scale, dtype=np.float64),
        )
    highs, lows = [float(c.max()) for c in candidates], [float(c.min()) for c in candidates]
    if any(np.isnan(extreme) for extreme in highs + lows):
        return float("nan"), float("nan")  # (Python's max/min would drop a NaN)
    return max(highs), min(lows)


class ScaledWeight:
    """The array ``np.multiply(values, row_scale, dtype=np.float64).astype(dtype)``, computed whenever it is read.

    A planned weight of a large layer. It behaves as a read-only array for ``numpy.asarray`` (and so for
    ``onnx_ir.Tensor``), computed in runs of leading-axis rows by parallel threads; a writer streams
    :meth:`blocks` instead, so neither the float64 product nor the cast result ever exists whole. The
    arithmetic per element is the one of :func:`cast_scaled_checked` (bit-identical). Its range is checked
    before it is made; ``values`` (a read-only initializer) must not change while the weight is alive.
    """

    def __init__(self, values: np.ndarray, row_scale: np.ndarray, dtype: np.dtype) -> None:
        self.values = values
        self.row_scale = row_scale
        self.dtype = np.dtype(dtype)
        self.shape = values.shape
        self.ndim = values.ndim
        self.size = values.size
        self.nbytes = values.size * self.dtype.itemsize
        self._slice_scale = row_scale.ndim == values.ndim and row_scale.shape[0] != 1

    def block_rows(self, alignment: int = 1) -> int:
        """Rows per block of :meth:`blocks`: about ``STREAM_BLOCK_BYTES`` of result, and a multiple of the rows
        that make whole ``alignment``-byte units (so that every block but the last suits direct I/O)."""
        row_bytes = max(1, self.nbytes // max(self.shape[0], 1))
        unit = alignment // math.gcd(row_bytes, alignment)
        return min(self.shape[0], max(unit, STREAM_BLOCK_BYTES // row_bytes // unit * unit))

    def blocks(self, buffer: np.ndarray, rows: int) -> Iterator[np.ndarray]:
        """The result as consecutive blocks of ``rows`` leading-axis rows (C order; the last may be shorter).

        Each block is one numpy call (widen, float64 multiply, cast on store: bit-identical to
        :func:`cast_scaled_checked`) that runs without the GIL, so a writer thread computing blocks hardly waits
        for the thread that walks the graph. Blocks are stored at the start of ``buffer`` (a C-contiguous
        ``uint8`` array of at least ``rows`` rows of result) and are valid until the next block is requested.
        """
        row_bytes = self.nbytes // max(self.shape[0], 1)
        for start in range(0, self.shape[0], rows):
            stop = min(start + rows, self.shape[0])
            block = buffer[: (stop - start) * row_bytes].view(self.dtype).reshape((stop - start, *self.shape[1:]))
            scale = self.row_scale[start:stop] if self._slice_scale else self.row_scale
            np.multiply(self.values[start:stop], scale, out=block, dtype=np.float64, casting="unsafe")
            yield block

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        result = np.empty(self.shape, dtype=self.dtype)

        def fill(first: int, last: int) -> None:
            scale = self.row_scale[first:last] if self._slice_scale else self.row_scale
            np.multiply(self.values[first:last], scale, out=result[first:last], dtype=np.float64, casting="unsafe")

        workers = min(_worker_count(), self.shape[0])  # contiguous runs of rows, one per thread
        bounds = [self.shape[0] * index // workers for index in range(workers + 1)]
        _parallel_map(fill, [(first, last) for first, last in itertools.pairwise(bounds) if last > first])
        return result if dtype is None else result.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"ScaledWeight(shape={self.shape}, dtype={self.dtype})"


def _worker_count() -> int:
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(len(available), _MAX_WORKERS))


_MAX_WORKERS = 8
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _parallel_map(work: Callable[[int, int], None], runs: list[tuple[int, int]]) -> None:
    """Call ``work(*run)`` for every run: the first in this thread, the others in a shared thread pool."""
    global _executor
    if len(runs) > 1 and _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="bnfold-cast")
    futures = [_executor.submit(work, *run) for run in runs[1:]]
    if runs:
        work(*runs[0])
    for future in futures:
        future.result()


def _forget_executor() -> None:
    """After ``fork`` the pool's threads do not exist in the child: start a new pool there when needed."""
    global _executor
    _executor = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


@functools.cache
def _finfo_max(dtype: ir.DataType) -> float:
    """The largest finite value of float ``dtype``."""
    return float(ml_dtypes.finfo(dtype.numpy()).max)


def _check_range(high: float, low: float, dtype: ir.DataType, what: str) -> None:
    """``Skip`` unless ``low..high`` is finite and within ``dtype``'s range."""
    if not (math.isfinite(high) and math.isfinite(low)):
        raise Skip(SkipReason.FOLDED_WEIGHTS_NOT_FINITE, f"folded {what} would contain NaN or Inf")
    limit = _finfo_max(dtype)
    largest = max(high, -low)
    if largest > limit:
        raise Skip(
            SkipReason.FOLDED_WEIGHTS_OVERFLOW,
            f"folded {what} reaches {largest:.6g}, beyond the {dtype.name} maximum {limit:.6g}",
        )
