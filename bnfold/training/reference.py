"""Reference BatchNormalization in numpy: forward (training and inference) and backward, exact to float64.

Shapes: ``x`` is ``(N, C, D1, ..., Dk)`` (any ``k >= 0``) or 1-D ``(N,)``, which is treated as ``C = 1``.
``scale``, ``bias``, ``mean`` and ``var`` are 1-D of length ``C``. Statistics are per channel, over the
``M = N * D1 * ... * Dk`` elements of that channel.

Training mode (``training=True``)::

    batch_mean = Σ x / M                       (two-pass with a correction step, see below)
    batch_var  = Σ (x − batch_mean)² / M       (biased, "population" variance)
    inv_std    = 1 / √(batch_var + ε)
    y          = (x − batch_mean) · (scale · inv_std) + bias

    convention="onnx":  running = input · momentum + batch · (1 − momentum)   (momentum default 0.9),
                        running_var uses batch_var (biased), as BatchNormalization-14/15 specify.
    convention="torch": running = (1 − f) · input + f · batch with f = momentum (default 0.1), or
                        f = 1 / (num_batches_tracked + 1) when momentum is None (cumulative average);
                        running_var uses the unbiased batch_var · M / (M − 1), as PyTorch does.

Inference mode (``training=False``): ``y = (x − mean) · (scale / √(var + ε)) + bias``; running statistics
are the inputs, unchanged; ``saved_mean``/``saved_inv_std`` are ``mean`` and ``1/√(var + ε)``.

Numerics: every sum runs in float64 whatever the input dtype (so float16/bfloat16 inputs accumulate in
something far wider than float32). The mean is computed twice — ``m0 = Σx/M``, then ``m = m0 + Σ(x − m0)/M``
— and the variance from the centred values, never as ``E[x²] − E[x]²``. The correction step makes the mean
of a constant channel exact, so its centred values are exactly 0.

Output dtypes follow the BatchNormalization-15 type rules: ``y`` has ``x``'s dtype, ``running_mean`` has
``mean``'s dtype and ``running_var`` has ``var``'s dtype. ``saved_mean`` and ``saved_inv_std`` are float64 for
float64 input and float32 otherwise (PyTorch's accumulation-type rule for its saved statistics).

Edge cases (defined behaviour):

- One element per channel (``M = 1``): batch_var is 0, so ``y = bias`` (ε > 0). ONNX convention: the running
  variance decays towards 0. Torch convention: :class:`~bnfold.errors.UsageError`, as
  ``torch.nn.functional.batch_norm`` raises "Expected more than 1 value per channel when training".
- Zero variance with ``epsilon=0``: ``inv_std`` is ``inf`` and ``0 · inf`` makes that channel's ``y`` NaN,
  exactly as the formula (and ONNX and PyTorch) say; the running statistics stay finite.
- NaN in one channel: that channel's ``y`` and statistics are NaN; other channels are untouched.
- No element in a channel (``M = 0``) in training mode: :class:`~bnfold.errors.UsageError`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import ml_dtypes
import numpy as np

from bnfold.errors import UsageError

Convention = Literal["onnx", "torch"]

# The momentum each convention means when the caller does not give one.
DEFAULT_MOMENTUM: dict[str, float] = {"onnx": 0.9, "torch": 0.1}
DEFAULT_EPSILON = 1e-5
# inf and NaN are defined results (zero variance with epsilon=0, NaN inputs, float16 overflow): no warnings.
_SPECIAL_VALUES_ARE_DEFINED = {"divide": "ignore", "invalid": "ignore", "over": "ignore"}

SUPPORTED_DTYPES = (
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


class _Default:
    """Sentinel for "the convention's default momentum" (``None`` already means the cumulative average)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


class BatchNormOutputs(NamedTuple):
    """What :func:`batch_norm_forward` returns; unpacks as a 5-tuple."""

    y: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    saved_mean: np.ndarray
    saved_inv_std: np.ndarray


class TrainingGradients(NamedTuple):
    """Gradients of a training-mode BatchNormalization (batch statistics depend on ``x``)."""

    dx: np.ndarray
    dscale: np.ndarray
    dbias: np.ndarray


class InferenceGradients(NamedTuple):
    """Gradients of an inference-mode BatchNormalization, including those w.r.t. ``mean`` and ``var``."""

    dx: np.ndarray
    dscale: np.ndarray
    dbias: np.ndarray
    dmean: np.ndarray
    dvar: np.ndarray


def saved_statistics_dtype(x_dtype: np.dtype) -> np.dtype:
    """float64 for float64 input, float32 for float32/float16/bfloat16 input."""
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def inverse_std(var: np.ndarray, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    """``1 / √(var + ε)`` in float64 (for the inference-mode gradients of given running statistics)."""
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + float(epsilon))


def batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, biased variance)`` of ``x`` (shape rules above), in float64.

    Two passes with a correction step: ``m0 = mean(x)``, ``m = m0 + mean(x − m0)``, ``var = mean((x − m)²)``.
    """
    by_channel = _channel_major(_checked_array(x, "x"))
    _require_elements(by_channel, np.shape(x))
    return _mean_and_variance(by_channel)


def batch_norm_forward(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    epsilon: float = DEFAULT_EPSILON,
    momentum: float | _Default | None = DEFAULT,
    training: bool = True,
    convention: Convention = "onnx",
    num_batches_tracked: int | None = None,
) -> BatchNormOutputs:
    """BatchNormalization forward; returns ``(y, running_mean, running_var, saved_mean, saved_inv_std)``.

    Args:
        x: ``(N, C, D1, ..., Dk)`` or ``(N,)``; float16, bfloat16 (``ml_dtypes``), float32 or float64.
        scale, bias, mean, var: 1-D of length ``C``, floating point (dtypes may differ from ``x``'s).
        epsilon: added to the variance; must be >= 0.
        momentum: by default 0.9 for ``convention="onnx"`` and 0.1 for ``convention="torch"``; the two
            conventions weigh the old running value oppositely (torch 0.1 == onnx 0.9). ``None`` (torch only)
            selects PyTorch's cumulative moving average.
        training: ``False`` applies the inference formula with the given ``mean``/``var``.
        convention: ``"onnx"`` (BatchNormalization-14/15) or ``"torch"``
            (``torch.nn.functional.batch_norm(training=True)``).
        num_batches_tracked: only with ``convention="torch", momentum=None``: the value of the module's
            ``num_batches_tracked`` buffer *before* this call (0 for a fresh module). PyTorch increments it
            first, so the averaging factor is ``1 / (num_batches_tracked + 1)``; the caller keeps the count.

    Raises:
        UsageError: unsupported dtypes, mismatched shapes, negative epsilon, a convention/momentum
            combination that does not exist, or an empty (or, torch convention, one-element) channel.
    """
    if convention not in DEFAULT_MOMENTUM:
        raise UsageError(f"convention must be 'onnx' or 'torch', got {convention!r}")
    weights = _update_weights(convention, momentum, num_batches_tracked, training)
    epsilon = _as_float(epsilon, "epsilon")
    if not epsilon >= 0.0:
        raise UsageError(f"epsilon must be >= 0, got {epsilon}")
    x = _checked_array(x, "x")
    channels = 1 if x.ndim == 1 else x.shape[1]
    scale, bias, mean, var = (
        _checked_parameter(array, name, channels)
        for array, name in ((scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var"))
    )
    with np.errstate(**_SPECIAL_VALUES_ARE_DEFINED):
        by_channel = _channel_major(x)
        saved_dtype = saved_statistics_dtype(x.dtype)
        if training:
            _require_elements(by_channel, x.shape)
            used_mean, batch_var = _mean_and_variance(by_channel)
            used_inv_std = 1.0 / np.sqrt(batch_var + epsilon)
            running_mean, running_var = _running_statistics(
                mean, var, used_mean, batch_var, weights, convention, by_channel.shape[1]
            )
        else:
            used_mean = mean.astype(np.float64)
            used_inv_std = 1.0 / np.sqrt(var.astype(np.float64) + epsilon)
            running_mean, running_var = mean.copy(), var.copy()
        multiplier = scale.astype(np.float64) * used_inv_std
        y_by_channel = (by_channel - used_mean[:, None]) * multiplier[:, None] + bias.astype(np.float64)[:, None]
        return BatchNormOutputs(
            y=_from_channel_major(y_by_channel, x.shape).astype(x.dtype),
            running_mean=running_mean,
            running_var=running_var,
            saved_mean=used_mean.astype(saved_dtype),
            saved_inv_std=used_inv_std.astype(saved_dtype),
        )


def batch_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    scale: np.ndarray,
    saved_mean: np.ndarray,
    saved_inv_std: np.ndarray,
    *,
    training: bool = True,
) -> TrainingGradients | InferenceGradients:
    """Gradients of BatchNormalization given the upstream gradient ``dy`` (same shape as ``x``).

    With ``x̂ = (x − saved_mean) · saved_inv_std`` and per-channel means ``⟨·⟩`` over the M elements:

    - ``dbias = Σ dy`` and ``dscale = Σ dy · x̂`` (both modes);
    - training (statistics computed from ``x``): ``dx = scale · inv_std · (dy − ⟨dy⟩ − x̂ · ⟨dy · x̂⟩)``,
      exact including ε (``saved_*`` are :func:`batch_norm_forward`'s outputs);
    - inference (``training=False``; pass ``mean`` and :func:`inverse_std` of ``var``, or the forward's
      inference-mode ``saved_*``): ``dx = dy · scale · inv_std``, ``dmean = −scale · inv_std · Σ dy`` and
      ``dvar = −½ · scale · inv_std² · Σ dy · x̂``.

    Computed in float64; ``dx`` has ``x``'s dtype, ``dscale``/``dbias`` have ``scale``'s dtype and
    ``dmean``/``dvar`` have ``saved_mean``'s dtype. In training mode ``Σ dx = 0`` per channel.
    """
    x = _checked_array(x, "x")
    dy = _checked_array(dy, "dy")
    if dy.shape != x.shape:
        raise UsageError(f"dy must have x's shape {x.shape}, got {dy.shape}")
    channels = 1 if x.ndim == 1 else x.shape[1]
    scale, saved_mean, saved_inv_std = (
        _checked_parameter(array, name, channels)
        for array, name in ((scale, "scale"), (saved_mean, "saved_mean"), (saved_inv_std, "saved_inv_std"))
    )
    with np.errstate(**_SPECIAL_VALUES_ARE_DEFINED):
        x_by_channel, dy_by_channel = _channel_major(x), _channel_major(dy)
        if training:
            _require_elements(x_by_channel, x.shape)
        inv_std = saved_inv_std.astype(np.float64)
        scale64 = scale.astype(np.float64)
        normalised = (x_by_channel - saved_mean.astype(np.float64)[:, None]) * inv_std[:, None]
        dbias = dy_by_channel.sum(axis=1)
        dscale = (dy_by_channel * normalised).sum(axis=1)
        if training:
            count = x_by_channel.shape[1]
            dx_by_channel = (scale64 * inv_std)[:, None] * (
                dy_by_channel - (dbias / count)[:, None] - normalised * (dscale / count)[:, None]
            )
        else:
            dx_by_channel = dy_by_channel * (scale64 * inv_std)[:, None]
        dx = _from_channel_major(dx_by_channel, x.shape).astype(x.dtype)
        if training:
            return TrainingGradients(dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype))
        dmean = -scale64 * inv_std * dbias
        dvar = -0.5 * scale64 * inv_std**2 * dscale
        stats_dtype = saved_mean.dtype
        return InferenceGradients(
            dx,
            dscale.astype(scale.dtype),
            dbias.astype(scale.dtype),
            dmean.astype(stats_dtype),
            dvar.astype(stats_dtype),
        )


def _update_weights(
    convention: str, momentum: float | _Default | None, num_batches_tracked: int | None, training: bool
) -> tuple[float, float]:
    """``(keep, factor)`` of ``running = keep · old + factor · batch``, exactly as each convention writes them.

    ONNX: ``(momentum, 1 − momentum)``; torch: ``(1 − f, f)`` with ``f = momentum`` or ``1 / (count + 1)``.
    """
    if momentum is DEFAULT:
        momentum = DEFAULT_MOMENTUM[convention]
    if momentum is None:
        if convention != "torch":
            raise UsageError("momentum=None (cumulative moving average) exists only with convention='torch'")
        if num_batches_tracked is None:
            if not training:
                return 1.0, 0.0
            raise UsageError("momentum=None needs num_batches_tracked (the module's count before this batch)")
        if isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, (int, np.integer)):
            raise UsageError(f"num_batches_tracked must be an int, got {type(num_batches_tracked).__name__}")
        if num_batches_tracked < 0:
            raise UsageError(f"num_batches_tracked must be >= 0, got {num_batches_tracked}")
        factor = 1.0 / (int(num_batches_tracked) + 1)
        return 1.0 - factor, factor
    if num_batches_tracked is not None:
        raise UsageError("num_batches_tracked only applies to convention='torch' with momentum=None")
    momentum = _as_float(momentum, "momentum")
    if convention == "onnx":
        return momentum, 1.0 - momentum
    return 1.0 - momentum, momentum


def _running_statistics(
    mean: np.ndarray,
    var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    weights: tuple[float, float],
    convention: str,
    count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend the batch statistics into the running ones, in float64, cast to the inputs' dtypes."""
    keep, factor = weights
    if convention == "torch":
        if count < 2:
            raise UsageError(
                "convention='torch' needs more than 1 value per channel in training mode "
                f"(torch.nn.functional.batch_norm raises too); got {count}"
            )
        batch_var = batch_var * (count / (count - 1))
    new_mean = mean.astype(np.float64) * keep + batch_mean * factor
    new_var = var.astype(np.float64) * keep + batch_var * factor
    return new_mean.astype(mean.dtype), new_var.astype(var.dtype)


def _as_float(value: object, name: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{name} must be a number, got {value!r}") from error


def _mean_and_variance(by_channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corrected two-pass per-row mean and biased variance of a ``(C, M)`` float64 array."""
    first_estimate = by_channel.mean(axis=1)
    mean = first_estimate + (by_channel - first_estimate[:, None]).mean(axis=1)
    centred = by_channel - mean[:, None]
    return mean, np.mean(centred * centred, axis=1)


def _checked_array(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype not in SUPPORTED_DTYPES:
        raise UsageError(f"{name} must be float16, bfloat16, float32 or float64, got {array.dtype}")
    if array.ndim == 0:
        raise UsageError(f"{name} must have at least 1 dimension (N,) or (N, C, ...), got a scalar")
    return array


def _checked_parameter(array: np.ndarray, name: str, channels: int) -> np.ndarray:
    array = _checked_array(array, name)
    if array.shape != (channels,):
        raise UsageError(f"{name} must have shape ({channels},) (one value per channel), got {array.shape}")
    return array


def _require_elements(by_channel: np.ndarray, shape: tuple[int, ...]) -> None:
    if by_channel.shape[1] == 0:
        raise UsageError(f"batch statistics need at least one element per channel; x has shape {shape}")


def _channel_major(x: np.ndarray) -> np.ndarray:
    """``(N, C, ...)`` or ``(N,)`` → contiguous float64 ``(C, M)`` (reductions then run along rows)."""
    batch = x.shape[0]
    channels = 1 if x.ndim == 1 else x.shape[1]
    as_ncl = x.reshape(batch, channels, math.prod(x.shape[2:]))
    by_channel = np.ascontiguousarray(as_ncl.transpose(1, 0, 2), dtype=np.float64)
    return by_channel.reshape(channels, batch * as_ncl.shape[2])


def _from_channel_major(by_channel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_channel_major` (still float64)."""
    channels, batch = by_channel.shape[0], shape[0]
    return by_channel.reshape(channels, batch, math.prod(shape[2:])).transpose(1, 0, 2).reshape(shape)
