"""BatchNormalization reduced to a per-channel affine map, computed once in float64.

Inference-mode BN is ``Y = (X - mean) / sqrt(var + epsilon) * scale + B`` per channel ``c`` (axis 1), i.e.
``Y = X * s + t`` with ``s = scale / sqrt(var + epsilon)`` and ``t = B - mean * s``. Every fold rule consumes
this one :class:`Affine`; none recomputes BN math.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Affine:
    """Per-channel ``Y = X * scale + shift`` (float64 arrays of shape ``[C]``).

    ``mean``, ``var`` and ``beta`` are the BN's own running statistics and β (float64), kept when the affine was
    built from a BN (:meth:`from_batch_norm`) for what needs more than the map itself (the precision estimate,
    :mod:`~bnfold.passes.precision`); an affine derived from another (a slice, an absorbed constant) has none.
    """

    scale: np.ndarray
    shift: np.ndarray
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    beta: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @classmethod
    def from_batch_norm(
        cls,
        gamma: np.ndarray,
        beta: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        epsilon: float,
    ) -> Affine:
        """Build the affine from BN parameters of any float dtype; the math runs in float64.

        Preconditions (checked by the caller): all four arrays are 1-D with the same length.
        ``epsilon`` is used as stored (a float32 attribute widened exactly to float64).
        """
        gamma64, beta64, mean64, var64 = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # (non-finite: the caller skips)
            scale = gamma64 / np.sqrt(var64 + np.float64(epsilon))
            shift = beta64 - mean64 * scale
        return cls(scale=scale, shift=shift, mean=mean64, var=var64, beta=beta64)

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.scale).all() and np.isfinite(self.shift).all())

    def scale_range(self) -> tuple[float, float] | tuple[None, None]:
        """(min, max) of the per-channel scale, for the report; ``(None, None)`` when there are no channels."""
        if self.scale.size == 0:
            return (None, None)
        return (float(self.scale.min()), float(self.scale.max()))
