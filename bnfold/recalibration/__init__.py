"""Recalibrate BatchNormalization running statistics from data (``bnfold recalibrate``, :func:`recalibrate`).

- :mod:`~bnfold.recalibration.api` — :func:`recalibrate`, :class:`RecalibrationReport`;
- :mod:`~bnfold.recalibration.statistics` — pooled (Chan et al.) and update_bn-style accumulators;
- :mod:`~bnfold.recalibration.graph` — targets, generations, calibration models, writing statistics back;
- :mod:`~bnfold.recalibration.data` — ``.npz`` batches read lazily.
"""

from __future__ import annotations

from bnfold.recalibration.api import RecalibrationRecord, RecalibrationReport, recalibrate
from bnfold.recalibration.data import NpzBatches

__all__ = ["NpzBatches", "RecalibrationRecord", "RecalibrationReport", "recalibrate"]
