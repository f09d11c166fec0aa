"""The fp16 precision guard: estimate, in the weights' dtype, the accuracy a fold costs before committing it.

Why a fold can cost accuracy
----------------------------
The fold is exact in float64, but the folded tensors are stored in the weights' dtype (unit roundoff ``u``:
2⁻¹¹ for fp16, 2⁻⁸ for bf16, 2⁻²⁴ for fp32). For a backward fold ``producer → BN`` channel ``c`` of the folded
layer computes::

    z'[c] = Σ_i W'[c, i]·x_i + b'[c]        W' = W·s,  b' = s·(b − m) + β,  s = γ/√(v + ε)

where ``m``, ``v`` are BN's running mean and variance (the statistics of the BN input ``y = Σ W x + b`` on the
data they were measured on) and ``b`` is the producer's bias (plus an absorbed ``Add``). The original computes
``y`` at full accumulator precision (onnxruntime's CPU kernels widen fp16 to fp32; so do tensor cores) and
rounds once, near the BN output ``z = s·(y − m) + β``. Its error on channel ``c`` is therefore at best about::

    e_orig[c] ≈ u · z_rms[c],          z_rms = √(s²·v + β²)     (the RMS of z over that data)

The folded layer instead stores ``W'`` and ``b'`` rounded (relative error ``u`` each) and rebuilds ``z`` from
them, so its error is about::

    e_fold[c] ≈ u · (|b'[c]| + |s[c]|·‖W[c]‖₂·X + z_rms[c])

- ``u·|b'|``: the rounding of the folded shift. When the BN input's mean is large against its spread
  (``|m − b| ≫ √v``, e.g. a running variance near zero with a realistic mean), ``b'`` is a large number that
  the sum ``Σ W'x`` must cancel to leave a small ``z``; the rounding of the large number stays in ``z``.
- ``u·|s|·‖W[c]‖₂·X``: the rounding of every folded weight (independent errors ``≤ u·|W'|``, whose sum over
  the inputs has an RMS of about ``u·‖W'[c] ⊙ x‖₂``). It is large when ``Σ W x`` cancels (zero-sum filters on a
  flat input) and ``s`` is large: the original cancels at full precision *before* the BN amplifies the
  small result, the fold amplifies every term and then cancels.
- ``X`` is the RMS of the layer's input, which the fold does not see; every channel of a layer reads the same
  input, and ``E[(Σ W[c]·x)²] = (m − b)² + v ≈ ‖W[c]‖₂²·X²`` for weights unrelated to the input's structure,
  so ``X`` is estimated as the median over the layer's channels of ``√((m − b)² + v) / ‖W[c]‖₂`` (the median
  ignores the few cancelling channels that the guard looks for). ``m − b = (β − b')/s`` comes from the plan.

The **precision cost** of a fold is the largest ratio over the BN's channels::

    cost = max_c e_fold[c] / e_orig[c] = max_c 1 + (|b'[c]| + |s[c]|·‖W[c]‖₂·X) / max(z_rms[c], median z_rms)

(the floor: a channel whose output is constant on the calibration data, ``z_rms[c] = 0``, is judged against the
layer's typical output instead of against 0).

``u`` cancels: the cost says how many times larger the folded channel's rounding error is than the
original's. It is about 2–4 on realistic BNs (``|m|`` within a few ``√v``) and grows as ``|m|/√v`` and as
the cancellation in ``Σ W x``. Constant factors of order one (half-ulp rounding, RMS vs. worst case) are
left out: the bound below is an order of magnitude away from realistic values. A backend that also rounds
``y`` to the dtype before the BN (fp16 Conv then fp16 BN, unfused) makes the original worse and the real
ratio smaller: the estimate errs towards guarding.

The bound
---------
A fold is skipped (``FOLD_LOSES_PRECISION``) when ``cost > bound(dtype) = max(16, 1e-4 / u)``: the fold
would multiply the BN's rounding error by more than 16, *and* that error (at least ``cost·u`` relative)
would be visible — above ``1e-4``, float32's verification tolerance. In fp16 and bf16 the first condition
decides; float32 needs a cost above ~1,700 and float64 never reaches it, so wide models practically always
fold. ``FoldBatchNormPass(precision_guard=False)`` (CLI ``--allow-precision-loss``) folds anyway.

Scope and cost
--------------
Estimated for backward folds whose weight update scales ``W`` per channel (``TensorUpdate.row_scale``:
Conv, Gemm, MatMul); other plans (ConvTranspose, forward folds) get no estimate (``None``) and are not
guarded. The weight norms are sums of squares of the original (un-multiplied) weight; a weight of more than
``NORM_SAMPLE_ELEMENTS`` elements is sampled at a stride along a reduced axis (the norm is rescaled), so the
estimate never materialises a large planned weight and costs a bounded amount per BN. A layer of at most
``SCALAR_CHANNELS`` channels has its costs computed on Python floats: the same IEEE float64 operations in the
same order (so the same value to the bit), without numpy's fixed cost per call, which dominates on a few channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold.passes.affine import Affine
from bnfold.passes.batch_norm import DEFAULT_EPSILON
from bnfold.passes.constants import ConstantResolver
from bnfold.passes.rule import FoldPlan, TensorUpdate

#: A fold may multiply a BN's rounding error by at most this much (see the module docstring).
PRECISION_COST_BOUND = 16.0
#: Below this relative error (float32's verification tolerance) a fold's rounding is not worth guarding.
VISIBLE_ERROR = 1e-4
#: Weights with more elements are sampled when their per-channel norms are estimated.
NORM_SAMPLE_ELEMENTS = 1 << 18
#: Up to this many channels the cost is computed on Python floats (identical results, see *Scope and cost*).
SCALAR_CHANNELS = 24

_FLOAT64 = np.dtype(np.float64)
_NATIVE_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), _FLOAT64})


@dataclasses.dataclass(frozen=True)
class BatchNormInput:
    """What the BN's parameters say about its input and output, per channel (float64 arrays ``[C]``).

    ``mean``, ``var``: the running statistics of the BN input; ``scale``: ``s = γ/√(var + ε)``; ``beta``: β.
    """

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    beta: np.ndarray

    @classmethod
    def from_parameters(
        cls, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
    ) -> BatchNormInput:
        gamma64, beta64, mean64, var64 = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            scale = gamma64 / np.sqrt(var64 + np.float64(epsilon))
        return cls(mean=mean64, var=np.maximum(var64, 0.0), scale=scale, beta=beta64)

    @classmethod
    def of_affine(cls, affine: Affine) -> BatchNormInput | None:
        """From the BN's own affine (which keeps its statistics); ``None`` for a derived affine."""
        if affine.mean is None or affine.var is None or affine.beta is None:
            return None
        return cls(mean=affine.mean, var=np.maximum(affine.var, 0.0), scale=affine.scale, beta=affine.beta)

    @classmethod
    def of_node(cls, node: ir.Node, constants: ConstantResolver) -> BatchNormInput:
        """Read from an inference-mode BN whose parameters are known to be constant 1-D ``[C]``."""
        gamma, beta, mean, var = (constants.array(value) for value in node.inputs[1:5])
        attribute = node.attributes.get("epsilon")
        epsilon = float(np.float32(DEFAULT_EPSILON)) if attribute is None else attribute.as_float()
        return cls.from_parameters(gamma, beta, mean, var, epsilon)

    def channels(self, start: int, stop: int) -> BatchNormInput:
        return BatchNormInput(*(array[start:stop] for array in (self.mean, self.var, self.scale, self.beta)))

    @property
    def output_rms(self) -> np.ndarray:
        """``z_rms = √(s²·v + β²)``: the RMS of the BN output over the data its statistics describe."""
        return np.sqrt(self.scale**2 * self.var + self.beta**2)


@functools.cache
def unit_roundoff(dtype: ir.DataType) -> float:
    """Half the distance from 1 to the next value of float ``dtype`` (fp16: 2⁻¹¹)."""
    return float(ml_dtypes.finfo(dtype.numpy()).eps) / 2


def precision_bound(dtype: ir.DataType) -> float:
    """The largest precision cost a fold into ``dtype`` may have: ``max(16, 1e-4 / u)``."""
    return max(PRECISION_COST_BOUND, VISIBLE_ERROR / unit_roundoff(dtype))


def channel_costs(statistics: BatchNormInput, weight_norms: np.ndarray, folded_shift: np.ndarray) -> np.ndarray | None:
    """The per-channel ratio ``e_fold / e_orig`` of the module docstring (float64 ``[C]``); ``None`` when the
    statistics give the layer no output scale (see :func:`_floored`).

    ``weight_norms``: ``‖W[c]‖₂`` of the original weight; ``folded_shift``: ``|b'[c]|`` (largest over any
    broadcast axes of the folded bias).
    """
    scale = statistics.scale
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        weight_mean = np.where(scale != 0, (statistics.beta - folded_shift) / scale, statistics.mean)
        input_rms = _median_ratio(np.sqrt(weight_mean**2 + statistics.var), weight_norms)
        weight_term = np.abs(scale) * weight_norms * input_rms
        rounding = np.abs(folded_shift) + weight_term
        output = _floored(statistics.output_rms)
        if output is None:
            return None
        cost = 1.0 + np.where(rounding > 0, rounding / output, 0.0)
    return np.where(np.isfinite(cost), cost, np.inf)


def _floored(output_rms: np.ndarray) -> np.ndarray | None:
    """``z_rms`` per channel, at least the layer's median ``z_rms``; ``None`` when that median is 0.

    A channel whose output is constant on the calibration data (``v = 0`` and ``β = 0``, or ``s = 0``) has
    ``z_rms = 0``: any rounding is infinitely worse *relative to that channel*, although what matters downstream is
    the error against the size of the layer's outputs. The median keeps the few degenerate channels from making
    every fold of such a layer look infinitely costly, while a cancelling channel is still judged against what
    the layer's other channels output.

    With a median of 0 the statistics describe a layer that outputs constants (e.g. all ``β = 0`` and ``v = 0``):
    there is no output scale to judge rounding against, so no estimate is made (the guard stays out).
    """
    finite = output_rms[np.isfinite(output_rms)]
    typical = _median(finite) if finite.size else 0.0
    if not typical > 0:
        return None
    return np.maximum(output_rms, typical)


def _median(values: np.ndarray) -> float:
    """The median of a non-empty 1-D array (``np.median`` costs ~20x more on the few channels of a BN)."""
    ordered = np.sort(values)
    middle = ordered.shape[0] // 2
    return float(ordered[middle] if ordered.shape[0] % 2 else (ordered[middle - 1] + ordered[middle]) / 2)


def _median_ratio(numerators: np.ndarray, denominators: np.ndarray) -> float:
    """The median of ``numerators / denominators`` over the channels with a non-zero, finite ratio (0 if none)."""
    usable = (denominators > 0) & np.isfinite(numerators) & np.isfinite(denominators)
    if not usable.any():
        return 0.0
    return _median(numerators[usable] / denominators[usable])


def fold_precision_cost(statistics: BatchNormInput, plans: Sequence[FoldPlan]) -> tuple[float, ir.DataType] | None:
    """The precision cost of a backward fold (largest channel ratio) and the dtype it is stored in; ``None``
    when a plan has no per-channel scaled weight (see *Scope* in the module docstring).

    ``plans``: one plan, or one per consecutive range of the BN's channels (a split Concat), in channel order.
    """
    channels, offset, costs, dtype = statistics.scale.shape[0], 0, [], None
    for plan in plans:
        weights = [update for update in plan.updates if update.row_scale is not None]
        if len(weights) != 1:
            return None
        weight = weights[0]
        squares = _channel_squares(weight.values, weight.row_scale)
        if squares is None or offset + squares.shape[0] > channels:
            return None
        count = squares.shape[0]
        shift = _folded_shift(plan, weight, count)
        if shift is None:
            return None
        part = statistics if offset == 0 and count == channels else statistics.channels(offset, offset + count)
        cost = _largest_cost(part, squares, shift)
        if cost is None:
            return None
        costs.append(cost)
        offset, dtype = offset + count, weight.dtype
    if offset != channels or dtype is None or not channels:
        return None
    return max(costs), dtype


def _largest_cost(statistics: BatchNormInput, squares: np.ndarray, folded_shift: np.ndarray) -> float | None:
    """The largest of :func:`channel_costs` for the weight's per-channel sums of squares ``squares``; on Python
    floats for at most ``SCALAR_CHANNELS`` float64 channels."""
    arrays = (statistics.scale, statistics.beta, statistics.mean, statistics.var, squares, folded_shift)
    if squares.shape[0] > SCALAR_CHANNELS or not all(array.dtype == _FLOAT64 for array in arrays):
        costs = channel_costs(statistics, np.sqrt(squares), folded_shift)
        return None if costs is None else float(costs.max())
    return _largest_scalar_cost(*[array.tolist() for array in arrays])


def _largest_scalar_cost(
    scale: list[float], beta: list[float], mean: list[float], var: list[float], squares: list[float], shift: list[float]
) -> float | None:
    """:func:`channel_costs` and its largest value, step by step on Python floats (NaN and ∞ as numpy has them:
    ``x != 0`` holds for NaN, comparisons with NaN fail, ``np.maximum`` propagates NaN; ``math.sqrt`` rounds
    as ``np.sqrt`` does, correctly)."""
    isfinite, sqrt = math.isfinite, math.sqrt
    ratios, finite, terms = [], [], []
    for s, b, m, v, w2, f in zip(scale, beta, mean, var, squares, shift, strict=True):
        w = sqrt(w2)
        weight_mean = (b - f) / s if s != 0 else m
        numerator = sqrt(weight_mean * weight_mean + v)
        if w > 0 and isfinite(numerator) and isfinite(w):
            ratios.append(numerator / w)
        output = sqrt(s * s * v + b * b)
        if isfinite(output):
            finite.append(output)
        terms.append((abs(f), abs(s) * w, output))  # (|b'|, |s|·‖W‖, z_rms)
    input_rms = _scalar_median(ratios) if ratios else 0.0
    typical = _scalar_median(finite) if finite else 0.0
    if not typical > 0:
        return None
    largest = 1.0  # (every cost is at least 1)
    for shift_term, weight_scale, output in terms:
        rounding = shift_term + weight_scale * input_rms
        if rounding > 0:
            cost = 1.0 + rounding / (output if output != output or output > typical else typical)  # (np.maximum)
            if not cost <= largest:  # (a larger cost, or NaN, which counts as ∞)
                largest = cost if isfinite(cost) else math.inf
    return largest


def _scalar_median(values: list[float]) -> float:
    """:func:`_median` of a non-empty list of floats, none of them NaN."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _folded_shift(plan: FoldPlan, weight: TensorUpdate, channels: int) -> np.ndarray | None:
    """``|b'|`` per channel: the residual shift, or the other planned update (a bias of shape ``[..., C]``)."""
    if plan.residual_shift is not None:
        shifts = [np.asarray(plan.residual_shift, dtype=np.float64)]
    else:
        shifts = [np.asarray(u.values, dtype=np.float64) for u in plan.updates if u is not weight]
    if len(shifts) != 1:
        return None
    shift = np.abs(shifts[0])
    if shift.shape == (channels,):  # (the common case: a bias, already one value per channel)
        return shift
    if shift.ndim == 0 or shift.shape[-1] not in (1, channels):
        return None
    shift = shift.reshape(-1, shift.shape[-1]).max(axis=0)
    return np.broadcast_to(shift, (channels,))


def channel_norms(values: np.ndarray, row_scale: np.ndarray) -> np.ndarray | None:
    """``‖W[c]‖₂`` per channel, the channel axis being the one along which ``row_scale`` varies.

    Bounded cost: beyond ``NORM_SAMPLE_ELEMENTS`` elements, every k-th entry of the longest reduced axis is
    used and the sum of squares rescaled (never a float64 copy of the whole weight).
    """
    squares = _channel_squares(values, row_scale)
    return None if squares is None else np.sqrt(squares)


def _channel_squares(values: np.ndarray, row_scale: np.ndarray) -> np.ndarray | None:
    """``‖W[c]‖₂²`` per channel (float64 ``[C]``), as :func:`channel_norms` describes."""
    reduced = _reduced_axes(values.ndim, row_scale.shape)
    if reduced is None:
        return None
    if len(reduced) == values.ndim:  # one channel
        return np.array([_sum_of_squares(values, reduced)])
    squares = _sum_of_squares(values, reduced)
    return squares if squares.ndim == 1 else squares.reshape(-1)


@functools.cache
def _reduced_axes(ndim: int, scale_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes a channel's sum of squares runs over: all but the one along which ``row_scale`` varies (all of
    them for one channel); ``None`` when it varies along several (or has more axes than the weight)."""
    if len(scale_shape) > ndim:
        return None
    scale_shape = (1,) * (ndim - len(scale_shape)) + scale_shape
    channel_axes = [axis for axis in range(ndim) if scale_shape[axis] != 1]
    if len(channel_axes) > 1:
        return None
    return tuple(axis for axis in range(ndim) if axis not in channel_axes)


def _sum_of_squares(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray | float:
    if values.size > NORM_SAMPLE_ELEMENTS and axes:
        axis = max(axes, key=lambda a: values.shape[a])
        stride = math.ceil(values.size / NORM_SAMPLE_ELEMENTS)
        index = [slice(None)] * values.ndim
        index[axis] = slice(None, None, stride)
        sample = values[tuple(index)]
        factor = values.shape[axis] / sample.shape[axis]
        return np.add.reduce(_squared(sample), axis=axes) * factor
    return np.add.reduce(_squared(values), axis=axes)


def _squared(values: np.ndarray) -> np.ndarray:
    """``values²`` in float64 (an exact widening, then one multiply); a native float is widened inside the
    ufunc, without a float64 copy of ``values`` first (the same array: same values, same memory order)."""
    if values.dtype in _NATIVE_FLOATS:
        return np.square(values, dtype=np.float64)
    return np.square(values.astype(np.float64))
