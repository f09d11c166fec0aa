"""Measurements of a candidate tensor against its reference, kept apart from any verdict.

For every output (and probed intermediate tensor) we record, over all iterations:

- absolute error ``e = |c - r|`` and relative error ``e / |r|`` (``0`` where both are 0, ``inf`` where only
  ``r`` is 0): max, mean and 99th percentile, on elements that are finite in both tensors;
- NaN/Inf placement: new NaN/Inf in the candidate, and reference NaN/Inf the candidate lost;
- element types and the shapes of every iteration;
- the *error frontier*: the vertices of the upper convex hull of the points ``(|r_i|, e_i)``.

The frontier makes any later judgement exact without keeping the tensors: the rule
``e_i <= atol + rtol·|r_i|`` holds for every element iff it holds for every frontier vertex, because
``max_i (e_i - rtol·|r_i|)`` (a support function of the point set) is attained on that hull. The same holds
for the smallest rtol at a given atol, a tangent from ``(0, atol)`` to the hull. The hull of a real error
distribution has a handful of vertices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.validate.tolerances import Tolerance

Point = tuple[float, float]


def encode_float(value: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def decode_float(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def error_frontier(reference_magnitude: np.ndarray, error: np.ndarray) -> tuple[Point, ...]:
    """Vertices ``(|r|, e)`` of the upper convex hull of the error points with ``e > 0``, by ``|r|`` ascending.

    Precondition: both arrays are 1-D float64 of equal length and finite.
    """
    mask = error > 0
    if not mask.any():
        return ()
    magnitude, error = reference_magnitude[mask], error[mask]
    order = np.lexsort((-error, magnitude))  # |r| ascending, the largest error first within ties
    magnitude, error = magnitude[order], error[order]
    # Pareto front: a point matters only if its error beats every point with a smaller |r|.
    running_max = np.maximum.accumulate(error)
    keep = np.ones(len(error), dtype=bool)
    keep[1:] = error[1:] > running_max[:-1]
    return upper_hull(zip(magnitude[keep].tolist(), error[keep].tolist(), strict=True))


def upper_hull(points: Sequence[Point] | Any) -> tuple[Point, ...]:
    """Upper convex hull (monotone chain) of points; the input may be in any order."""
    hull: list[Point] = []
    for point in sorted(set(points)):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (point[1] - y0) - (y1 - y0) * (point[0] - x0) >= 0:
                hull.pop()  # hull[-1] lies on or below the chord: not a vertex
            else:
                break
        hull.append(point)
    # Keep the part that can maximise e - rtol·|r| for rtol >= 0: up to the largest error.
    peak = max(range(len(hull)), key=lambda index: (hull[index][1], -index)) if hull else -1
    return tuple(hull[: peak + 1])


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """Error statistics of the elements that are finite in both tensors (see module docstring)."""

    compared: int
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    frontier: tuple[Point, ...]

    def required_atol(self, rtol: float) -> float:
        """The smallest atol that passes every element at this rtol."""
        return max([0.0, *(error - rtol * magnitude for magnitude, error in self.frontier)])

    def required_rtol(self, atol: float) -> float:
        """The smallest rtol that passes every element at this atol (``inf`` if some ``r = 0`` needs more)."""
        needed = 0.0
        for magnitude, error in self.frontier:
            if error > atol:
                needed = max(needed, (error - atol) / magnitude if magnitude > 0 else math.inf)
        return needed

    def within(self, tolerance: Tolerance) -> bool:
        return all(error <= tolerance.atol + tolerance.rtol * magnitude for magnitude, error in self.frontier)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"compared": self.compared}
        for field in dataclasses.fields(self):
            if field.name not in data and field.name != "frontier":
                data[field.name] = encode_float(getattr(self, field.name))
        data["frontier"] = [[encode_float(m), encode_float(e)] for m, e in self.frontier]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorStats:
        values = {
            field.name: decode_float(data[field.name])
            for field in dataclasses.fields(cls)
            if field.name not in ("compared", "frontier")
        }
        frontier = tuple((decode_float(m), decode_float(e)) for m, e in data["frontier"])
        return cls(compared=int(data["compared"]), frontier=frontier, **values)


@dataclasses.dataclass(frozen=True)
class TensorMetrics:
    """Everything measured for one tensor (a graph output or a probed intermediate) on one provider.

    ``candidate_dtype`` and ``candidate_shapes`` are ``None`` when the candidate lacks the tensor.
    ``errors`` is ``None`` when no iteration had comparable shapes or the tensor holds strings; ``unequal``
    counts differing elements of string tensors, which must match exactly.
    """

    name: str
    reference_dtype: str
    candidate_dtype: str | None
    reference_shapes: tuple[tuple[int, ...], ...]
    candidate_shapes: tuple[tuple[int, ...], ...] | None
    errors: ErrorStats | None
    new_nan: int = 0
    lost_nan: int = 0
    new_inf: int = 0
    lost_inf: int = 0
    unequal: int = 0

    @property
    def missing(self) -> bool:
        return self.candidate_dtype is None

    @property
    def shape_mismatches(self) -> tuple[int, ...]:
        """Iterations whose candidate shape differs from the reference shape."""
        if self.candidate_shapes is None:
            return ()
        return tuple(
            index
            for index, (reference, candidate) in enumerate(
                zip(self.reference_shapes, self.candidate_shapes, strict=True)
            )
            if reference != candidate
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reference_dtype": self.reference_dtype,
            "candidate_dtype": self.candidate_dtype,
            "reference_shapes": [list(shape) for shape in self.reference_shapes],
            "candidate_shapes": None
            if self.candidate_shapes is None
            else [list(shape) for shape in self.candidate_shapes],
            "errors": None if self.errors is None else self.errors.to_dict(),
            "new_nan": self.new_nan,
            "lost_nan": self.lost_nan,
            "new_inf": self.new_inf,
            "lost_inf": self.lost_inf,
            "unequal": self.unequal,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorMetrics:
        candidate_shapes = data.get("candidate_shapes")
        return cls(
            name=data["name"],
            reference_dtype=data["reference_dtype"],
            candidate_dtype=data.get("candidate_dtype"),
            reference_shapes=tuple(tuple(shape) for shape in data["reference_shapes"]),
            candidate_shapes=None if candidate_shapes is None else tuple(tuple(s) for s in candidate_shapes),
            errors=None if data.get("errors") is None else ErrorStats.from_dict(data["errors"]),
            new_nan=int(data.get("new_nan", 0)),
            lost_nan=int(data.get("lost_nan", 0)),
            new_inf=int(data.get("new_inf", 0)),
            lost_inf=int(data.get("lost_inf", 0)),
            unequal=int(data.get("unequal", 0)),
        )


def dtype_name(array: np.ndarray) -> str:
    return np.dtype(array.dtype).name


class TensorComparator:
    """Accumulates the comparison of one tensor over iterations; :meth:`result` gives :class:`TensorMetrics`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reference_dtype: str | None = None
        self._candidate_dtype: str | None = None
        self._reference_shapes: list[tuple[int, ...]] = []
        self._candidate_shapes: list[tuple[int, ...]] = []
        self._missing = False
        # Max and sums accumulate per iteration; the arrays are kept for the percentiles.
        self._max = {"abs": 0.0, "rel": 0.0}
        self._sum = {"abs": 0.0, "rel": 0.0}
        self._compared = 0
        self._abs: list[np.ndarray] = []
        self._rel: list[np.ndarray] = []
        self._frontier: list[Point] = []
        self._counts = {"new_nan": 0, "lost_nan": 0, "new_inf": 0, "lost_inf": 0, "unequal": 0}

    def add(self, reference: np.ndarray, candidate: np.ndarray | None) -> None:
        """Compare one iteration; ``candidate=None`` means the candidate does not produce this tensor."""
        reference = np.asarray(reference)
        self._reference_dtype = self._reference_dtype or dtype_name(reference)
        self._reference_shapes.append(tuple(int(d) for d in reference.shape))
        if candidate is None:
            self._missing = True
            return
        candidate = np.asarray(candidate)
        self._candidate_dtype = self._candidate_dtype or dtype_name(candidate)
        self._candidate_shapes.append(tuple(int(d) for d in candidate.shape))
        if reference.shape != candidate.shape:
            return
        if reference.dtype.kind in "OSU" or candidate.dtype.kind in "OSU":  # strings must match exactly
            self._counts["unequal"] += int(np.count_nonzero(reference != candidate))
            return
        self._compare_values(_as_float64(reference).ravel(), _as_float64(candidate).ravel())

    def _compare_values(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference_nan, candidate_nan = np.isnan(reference), np.isnan(candidate)
        reference_inf, candidate_inf = np.isinf(reference), np.isinf(candidate)
        self._counts["new_nan"] += int(np.count_nonzero(candidate_nan & ~reference_nan))
        self._counts["lost_nan"] += int(np.count_nonzero(reference_nan & ~candidate_nan))
        # An infinity is placed correctly only where the reference holds the same signed infinity.
        same_inf = reference_inf & candidate_inf & (np.sign(reference) == np.sign(candidate))
        self._counts["new_inf"] += int(np.count_nonzero(candidate_inf & ~same_inf))
        self._counts["lost_inf"] += int(np.count_nonzero(reference_inf & ~same_inf & ~candidate_nan))
        finite = np.isfinite(reference) & np.isfinite(candidate)
        magnitude = np.abs(reference[finite])
        error = np.abs(candidate[finite] - reference[finite])
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(error == 0, 0.0, error / magnitude)
        if error.size:
            for key, values in (("abs", error), ("rel", relative)):
                self._max[key] = max(self._max[key], float(values.max()))
                self._sum[key] += float(values.sum())
        self._compared += int(error.size)
        self._abs.append(error)
        self._rel.append(relative)
        self._frontier.extend(error_frontier(magnitude, error))

    def result(self) -> TensorMetrics:
        return TensorMetrics(
            name=self.name,
            reference_dtype=self._reference_dtype or "unknown",
            candidate_dtype=None if self._missing else self._candidate_dtype,
            reference_shapes=tuple(self._reference_shapes),
            candidate_shapes=None if self._missing else tuple(self._candidate_shapes),
            errors=self._error_stats(),
            **self._counts,
        )

    def _error_stats(self) -> ErrorStats | None:
        if not self._abs:
            return None
        if self._compared == 0:
            return ErrorStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ())
        errors, relative = np.concatenate(self._abs), np.concatenate(self._rel)
        return ErrorStats(
            compared=self._compared,
            max_abs=self._max["abs"],
            mean_abs=self._sum["abs"] / self._compared,
            p99_abs=float(np.percentile(errors, 99, method="higher")),
            max_rel=self._max["rel"],
            mean_rel=self._sum["rel"] / self._compared,
            p99_rel=float(np.percentile(relative, 99, method="higher")),
            frontier=upper_hull(self._frontier),
        )


def _as_float64(array: np.ndarray) -> np.ndarray:
    """Values as float64 for comparison (bool and integers included; bfloat16/float16 convert exactly)."""
    return array.astype(np.float64, copy=False)
