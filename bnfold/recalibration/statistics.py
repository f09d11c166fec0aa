"""Per-channel statistics accumulated batch by batch, in float64, with bounded memory.

Two accumulators, one per mode of :func:`bnfold.recalibrate`:

- :class:`PooledStatistics` (default): the exact mean and variance over *all* elements of a channel seen so far.
  Each batch is reduced to ``(count, mean, M2)`` by the reference op's corrected two-pass
  :func:`bnfold.training.batch_statistics` (``M2 = biased variance · count``), then merged with Chan, Golub and
  LeVeque's parallel update::

      n = n_a + n_b;   δ = mean_b − mean_a
      mean = mean_a + δ · n_b / n
      M2   = M2_a + M2_b + δ² · n_a · n_b / n

  The result does not depend on how the data is split into batches (up to float64 rounding, ~1e-15 relative).
  Variance: ``M2 / n`` (biased, ONNX convention) or ``M2 / (n − 1)`` (unbiased, torch convention).
- :class:`TorchAverage` (``match_torch``): what ``torch.optim.swa_utils.update_bn`` leaves in a BatchNorm —
  ``momentum=None`` makes PyTorch keep the cumulative average of the per-batch statistics: after batch ``k``
  (``k = 1, 2, …``), ``running = (1 − 1/k) · running + (1/k) · batch`` with the batch mean and the *unbiased*
  batch variance ``biased · M / (M − 1)`` (``M`` elements per channel in the batch). Depends on the split.

Only ``(count, mean, M2)`` per channel is kept: memory is O(channels), whatever the number of batches.
"""

from __future__ import annotations

import numpy as np

from bnfold.errors import UsageError
from bnfold.training import batch_statistics


def elements_per_channel(x: np.ndarray) -> int:
    """``M = N · D1 · … · Dk`` for ``x`` of shape ``(N, C, D1, …, Dk)``; ``N`` for 1-D ``x``."""
    channels = 1 if x.ndim == 1 else x.shape[1]
    return x.size // channels if channels else 0


def _check_channels(x: np.ndarray, channels: int) -> None:
    found = 1 if x.ndim == 1 else x.shape[1] if x.ndim > 1 else None
    if found != channels:
        raise UsageError(f"its input has shape {list(x.shape)}, not {channels} channels on axis 1")


class PooledStatistics:
    """Exact per-channel count, mean and M2 over every element added (Chan et al. parallel merge)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.count = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        """Merge one batch ``x`` (``(N, C, …)`` or ``(N,)``, any float dtype); an empty batch changes nothing."""
        _check_channels(x, self.channels)
        batch_count = elements_per_channel(x)
        if batch_count == 0:
            return
        batch_mean, batch_var = batch_statistics(x)
        self.merge(batch_count, batch_mean, batch_var * batch_count)

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge statistics ``(count, mean, M2)`` of other elements into these."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def variance(self, *, unbiased: bool) -> np.ndarray:
        """``M2 / n`` or, with ``unbiased``, ``M2 / (n − 1)``; UsageError when there are too few elements."""
        needed = 2 if unbiased else 1
        if self.count < needed:
            raise UsageError(f"{self.count} element(s) per channel: the variance needs at least {needed}")
        return self.m2 / (self.count - 1 if unbiased else self.count)


class TorchAverage:
    """``update_bn``'s result: cumulative average of per-batch means and unbiased per-batch variances."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.batches = 0
        self.count = 0
        self.mean = np.zeros(channels, dtype=np.float64)  # torch's reset_running_stats(): mean 0, var 1
        self.var = np.ones(channels, dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        """Average in one batch; UsageError for one element per channel (torch raises in training mode too)."""
        _check_channels(x, self.channels)
        batch_count = elements_per_channel(x)
        if batch_count < 2:
            raise UsageError(
                f"a batch has {batch_count} value(s) per channel; torch's update_bn needs more than 1 "
                "(training-mode batch_norm raises 'Expected more than 1 value per channel')"
            )
        batch_mean, batch_var = batch_statistics(x)
        unbiased = batch_var * (batch_count / (batch_count - 1))
        self.batches += 1
        self.count += batch_count
        factor = 1.0 / self.batches
        self.mean = (1.0 - factor) * self.mean + factor * batch_mean
        self.var = (1.0 - factor) * self.var + factor * unbiased
