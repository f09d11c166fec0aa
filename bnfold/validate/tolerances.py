"""The one tolerance table: how far a candidate's output may stray from the reference, per dtype.

An element passes when ``|candidate - reference| <= atol + rtol * |reference|`` (the ``numpy.isclose`` rule,
asymmetric: the reference is the original model on onnxruntime CPU). A tensor passes when every element
does and NaN/Inf sit at exactly the same places (a new NaN/Inf always fails, whatever the tolerance).

Defaults, keyed by the output's element type (``docs/validation.md`` has the measurements behind them):

========  =====  =====  =========================================================================
dtype     atol   rtol   why
========  =====  =====  =========================================================================
float64   1e-9   1e-7   epsilon 2^-52; derived, not measured (onnxruntime CPU has no float64 Conv)
float32   1e-4   1e-4   measured on models/: max abs error <= 5e-6, >= 20x headroom
float16   1e-2   1e-2   measured on models/: max abs error <= 3.9e-3 (4 fp16 ulps at 1.0)
bfloat16  8e-2   8e-2   8x the float16 row: bfloat16 epsilon 2^-7 is 8x float16's 2^-10
========  =====  =====  =========================================================================

Every other element type (integers, bool) must match exactly. Overrides: one ``atol``/``rtol`` for every
output, and per-output values (``name -> value``) that win over both the global value and the table.

**The float64 rule** (:class:`Float64Rule`), used when the table above fails a candidate on numbers
alone (no NaN, shape or dtype difference), and always when an output or probe is float16/bfloat16 (the
table's 1e-2 cannot tell a fold bug from rounding there), unless an atol/rtol was given explicitly (an
explicit bound is a fixed bound: :attr:`ToleranceTable.fixed_bound`). Each output and each probed fold
output ``T`` is then
measured against the original evaluated in float64 (``t``), for the original float32 model (``o``) and
the candidate (``c``), and the candidate passes ``T`` when every element satisfies

    ``|c - t| <= ratio · max|o - t| + atol + rtol · |t|``

with ``ratio`` = :data:`FLOAT64_RATIO` and the floor ``atol``/``rtol`` of ``T``'s dtype from the table above
(float16/bfloat16: ``rtol`` = the type's epsilon, no atol; :meth:`Float64Rule.floor`):
the candidate may be at most ``ratio`` times as far from the truth as the original float32 model is, plus
the floor that a well-conditioned tensor needs anyway. Measured on ill-conditioned zoo networks, a correct
fold's distance is 0.4-1.6× the original's; the injected bugs of ``tests/validate`` are >= 100× at the fold
they break (``docs/validation.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from bnfold.errors import UsageError


def _check_value(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{what} must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Absolute and relative tolerance of the rule ``|c - r| <= atol + rtol * |r|``."""

    atol: float
    rtol: float

    def __post_init__(self) -> None:
        _check_value(self.atol, "atol")
        _check_value(self.rtol, "rtol")

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


EXACT = Tolerance(atol=0.0, rtol=0.0)

#: Default tolerances keyed by element type name (``numpy``/``ml_dtypes`` spelling).
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(atol=1e-9, rtol=1e-7),
        "float32": Tolerance(atol=1e-4, rtol=1e-4),
        "float16": Tolerance(atol=1e-2, rtol=1e-2),
        "bfloat16": Tolerance(atol=8e-2, rtol=8e-2),
    }
)


#: How many times as far from the float64 truth as the original float32 model a candidate may be.
FLOAT64_RATIO = 4.0


#: Machine epsilon of the reduced-precision float types. For these the tolerance table cannot tell a fold bug
#: from rounding (a 5 % wrong weight row fits fp16's 1e-2 + 1e-2·|ref|), so the float64 rule decides for
#: every tensor of these types, even when the table passes, with a floor derived from the type itself.
REDUCED_PRECISION_EPSILON: Mapping[str, float] = MappingProxyType({"float16": 2.0**-10, "bfloat16": 2.0**-7})


def is_reduced_precision(dtype: str | None) -> bool:
    """Whether ``dtype`` (numpy/ml_dtypes spelling) is float16 or bfloat16."""
    return dtype in REDUCED_PRECISION_EPSILON


@dataclasses.dataclass(frozen=True)
class Float64Rule:
    """``|c - t| <= ratio · original_max_abs + floor.atol + floor.rtol · |t|`` (see the module docstring)."""

    ratio: float = FLOAT64_RATIO

    def __post_init__(self) -> None:
        _check_value(self.ratio, "ratio")

    def floor(self, dtype: str, table: Tolerance) -> Tolerance:
        """The floor for a tensor of element type ``dtype`` whose tolerance-table entry is ``table``.

        float32/float64: the table's entry (the bound a well-conditioned tensor needs anyway). float16 and
        bfloat16: ``rtol`` = the type's epsilon (one ulp of ``|t|``: what rounding the result to the type
        alone may cost), no atol: the table's 1e-2/8e-2 would hide a wrong fold, and the ratio term already
        holds the absolute error the original's own rounding makes.
        """
        if is_reduced_precision(dtype):
            return Tolerance(atol=0.0, rtol=REDUCED_PRECISION_EPSILON[dtype])
        return table

    def bound(self, floor: Tolerance, original_max_abs: float) -> Tolerance:
        """The elementwise tolerance the candidate's distance to the truth must meet."""
        return Tolerance(atol=floor.atol + self.ratio * original_max_abs, rtol=floor.rtol)


def _frozen(mapping: Mapping[str, float] | None, what: str) -> Mapping[str, float]:
    values = dict(mapping or {})
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise UsageError(f"a per-output {what} needs an output name, got {name!r}")
        _check_value(value, f"{what} of {name!r}")
    return MappingProxyType(values)


@dataclasses.dataclass(frozen=True)
class ToleranceTable:
    """Tolerances by dtype plus overrides; :meth:`for_output` resolves the one that applies.

    Resolution for output ``name`` of element type ``dtype``, each field on its own:
    per-output override → global override (floating outputs only) → ``by_dtype[dtype]`` → exact.
    """

    by_dtype: Mapping[str, Tolerance] = dataclasses.field(default_factory=lambda: DEFAULT_TOLERANCES)
    atol: float | None = None
    rtol: float | None = None
    output_atol: Mapping[str, float] = dataclasses.field(default_factory=dict)
    output_rtol: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_dtype", MappingProxyType(dict(self.by_dtype)))
        object.__setattr__(self, "output_atol", _frozen(self.output_atol, "atol"))
        object.__setattr__(self, "output_rtol", _frozen(self.output_rtol, "rtol"))
        for what in ("atol", "rtol"):
            if getattr(self, what) is not None:
                _check_value(getattr(self, what), what)
                object.__setattr__(self, what, float(getattr(self, what)))

    @classmethod
    def with_overrides(
        cls,
        atol: float | Mapping[str, float] | None = None,
        rtol: float | Mapping[str, float] | None = None,
        *,
        base: ToleranceTable | None = None,
    ) -> ToleranceTable:
        """``base`` (default table) with ``atol``/``rtol`` given as one number or as ``{output: value}``."""
        table = base or cls()
        changes: dict[str, Any] = {}
        for what, value in (("atol", atol), ("rtol", rtol)):
            if value is None:
                continue
            if isinstance(value, Mapping):
                changes[f"output_{what}"] = {**getattr(table, f"output_{what}"), **value}
            else:
                changes[what] = value
        return dataclasses.replace(table, **changes)

    def for_output(self, name: str, dtype: str) -> Tolerance:
        """The tolerance for output (or probed tensor) ``name`` whose reference element type is ``dtype``."""
        base = self.by_dtype.get(dtype)
        floating = base is not None
        base = base or EXACT
        atol = self.output_atol.get(name, self.atol if floating and self.atol is not None else base.atol)
        rtol = self.output_rtol.get(name, self.rtol if floating and self.rtol is not None else base.rtol)
        return Tolerance(atol=atol, rtol=rtol)

    @property
    def fixed_bound(self) -> bool:
        """Whether an atol/rtol was given explicitly: then it is the bound, with no float64 rescue."""
        return self.atol is not None or self.rtol is not None or bool(self.output_atol) or bool(self.output_rtol)

    def unknown_outputs(self, names: set[str]) -> list[str]:
        """Per-output overrides that name no output in ``names`` (a likely typo)."""
        return sorted((set(self.output_atol) | set(self.output_rtol)) - names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_dtype": {dtype: tolerance.to_dict() for dtype, tolerance in self.by_dtype.items()},
            "atol": self.atol,
            "rtol": self.rtol,
            "output_atol": dict(self.output_atol),
            "output_rtol": dict(self.output_rtol),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToleranceTable:
        return cls(
            by_dtype={dtype: Tolerance(**value) for dtype, value in data["by_dtype"].items()},
            atol=data.get("atol"),
            rtol=data.get("rtol"),
            output_atol=data.get("output_atol") or {},
            output_rtol=data.get("output_rtol") or {},
        )
