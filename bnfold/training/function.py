"""Training-mode BatchNormalization (and its gradient) as ONNX functions written with onnxscript.

``bnfold.BatchNormalizationTraining(X, scale, B, input_mean, input_var, epsilon, momentum)
→ (Y, running_mean, running_var, saved_mean, saved_inv_std)`` with integer attributes ``y_dtype`` and
``stats_dtype`` (``onnx.TensorProto`` data types of Y and of the statistics). It computes exactly what
:func:`bnfold.training.batch_norm_forward` computes with ``convention="onnx"``:

- ``X`` (``(N, C, D1..Dk)`` or ``(N,)``) is cast to double and viewed as ``(N, C, L)``;
- ``mean = m0 + mean(X − m0)`` with ``m0 = mean(X)``, ``var = mean((X − mean)²)`` (biased), per channel;
- ``Y = (X − mean) · (scale · inv_std) + B`` with ``inv_std = 1/√(var + epsilon)``;
- ``running = input · momentum + batch · (1 − momentum)``; statistics take ``input_mean``'s shape (``(C,)``, or
  the parameters' shape when a ``spatial=0`` X was flattened to ``(N, C·D1·…·Dk)`` by the caller).

Integer constants in the bodies are double tensors cast to int64, because ``Constant`` only holds float types
before opset 9.

``epsilon`` and ``momentum`` are scalar *inputs* (any float type, used in double), not attributes: the body
then needs no ``Constant(value_float=...)`` (opset 12+) nor ``CastLike`` (opset 15+), so one body runs at
every default-domain opset from 7 on. A caller can also feed a changing momentum (PyTorch's cumulative
average: ``momentum = 1 − 1/(n + 1)``). The per-channel mean lives in the helper function
``bnfold.BatchMean``, whose body depends on the opset: ``ReduceMean`` takes ``axes`` as an attribute below
opset 18 and as an input from 18 on. :func:`training_functions` returns the set for a given opset.

``bnfold.BatchNormalizationTrainingGrad(dY, X, scale, saved_mean, saved_inv_std) → (dX, dscale, dB)`` with
attributes ``x_dtype`` and ``scale_dtype`` is the training-mode gradient of
:func:`bnfold.training.batch_norm_backward`.

Everything is computed in double (every sum included), so float16/bfloat16/float32 inputs accumulate in
double; outputs are cast once to the requested dtypes.
"""

from __future__ import annotations

import onnx
from onnxscript import opset13, opset18, script, values

from bnfold.errors import UsageError
from bnfold.training.names import (
    DOMAIN,
    DOMAIN_VERSION,
    GRADIENT_FUNCTION,
    MEAN_FUNCTION,
    MINIMUM_OPSET,
    REDUCE_MEAN_AXES_INPUT_OPSET,
    TRAINING_FUNCTION,
)

_bnfold = values.Opset(DOMAIN, DOMAIN_VERSION)
_DOUBLE = onnx.TensorProto.DOUBLE
_ONE = onnx.helper.make_tensor("one", _DOUBLE, [], [1.0])
_INT64 = onnx.TensorProto.INT64
# Integer constants are double tensors cast to int64: Constant-1 (opsets 7–8) only holds float types, and a
# Python list in Concat would make onnxscript insert CastLike (opset 15+).
_ZERO_1D = onnx.helper.make_tensor("zero", _DOUBLE, [1], [0.0])
_ONE_1D = onnx.helper.make_tensor("one_1d", _DOUBLE, [1], [1.0])
_MINUS_ONE_1D = onnx.helper.make_tensor("minus_one", _DOUBLE, [1], [-1.0])
_BATCH_AXES = onnx.helper.make_tensor("batch_axes", _INT64, [2], [0, 2])  # only used at opset >= 18
_PARAMETER_SHAPE = onnx.helper.make_tensor("parameter_shape", _DOUBLE, [3], [1.0, -1.0, 1.0])


@script(_bnfold)
def BatchMean(X3):
    """Per-channel mean of a ``(N, C, L)`` tensor over N and L, kept as ``(1, C, 1)`` (ReduceMean-18)."""
    axes = opset18.Constant(value=_BATCH_AXES)
    return opset18.ReduceMean(X3, axes, keepdims=1)


@script(_bnfold)
def BatchMeanAxesAttribute(X3):
    """:func:`BatchMean` for default-domain opsets 7–17 (``axes`` is an attribute there)."""
    return opset13.ReduceMean(X3, axes=[0, 2], keepdims=1)


@script(_bnfold)
def BatchNormalizationTraining(X, scale, B, input_mean, input_var, epsilon, momentum, y_dtype: int, stats_dtype: int):
    """Training-mode BatchNormalization (ONNX semantics) computed in double; see the module docstring."""
    zero = opset18.Cast(opset18.Constant(value=_ZERO_1D), to=_INT64)
    one = opset18.Cast(opset18.Constant(value=_ONE_1D), to=_INT64)
    minus_one = opset18.Cast(opset18.Constant(value=_MINUS_ONE_1D), to=_INT64)
    parameter_shape = opset18.Cast(opset18.Constant(value=_PARAMETER_SHAPE), to=_INT64)
    x_shape = opset18.Shape(X)
    # Append a 1 so that a 1-D X of shape (N,) reads as N samples of C = 1 channel.
    padded_shape = opset18.Concat(x_shape, one, axis=0)
    batch = opset18.Gather(padded_shape, zero)
    channels = opset18.Gather(padded_shape, one)
    x3 = opset18.Reshape(opset18.Cast(X, to=_DOUBLE), opset18.Concat(batch, channels, minus_one, axis=0))
    first_estimate = BatchMean(x3)
    mean = first_estimate + BatchMean(x3 - first_estimate)
    centred = x3 - mean
    var = BatchMean(centred * centred)
    inv_std = opset18.Reciprocal(opset18.Sqrt(var + opset18.Cast(epsilon, to=_DOUBLE)))
    scale3 = opset18.Reshape(opset18.Cast(scale, to=_DOUBLE), parameter_shape)
    bias3 = opset18.Reshape(opset18.Cast(B, to=_DOUBLE), parameter_shape)
    y3 = centred * (scale3 * inv_std) + bias3
    Y = opset18.Cast(opset18.Reshape(y3, x_shape), to=y_dtype)
    keep = opset18.Cast(momentum, to=_DOUBLE)
    blend = opset18.Constant(value=_ONE) - keep
    # Statistics take the shape of input_mean: (C,), or (C, D1, ..., Dk) for a flattened spatial=0 X.
    stats_shape = opset18.Shape(input_mean)
    batch_mean = opset18.Reshape(mean, stats_shape)
    batch_var = opset18.Reshape(var, stats_shape)
    running_mean = opset18.Cast(opset18.Cast(input_mean, to=_DOUBLE) * keep + batch_mean * blend, to=stats_dtype)
    running_var = opset18.Cast(opset18.Cast(input_var, to=_DOUBLE) * keep + batch_var * blend, to=stats_dtype)
    saved_mean = opset18.Cast(batch_mean, to=stats_dtype)
    saved_inv_std = opset18.Cast(opset18.Reshape(inv_std, stats_shape), to=stats_dtype)
    return Y, running_mean, running_var, saved_mean, saved_inv_std


@script(_bnfold)
def BatchNormalizationTrainingGrad(dY, X, scale, saved_mean, saved_inv_std, x_dtype: int, scale_dtype: int):
    """``dX = scale·inv_std·(dY − ⟨dY⟩ − x̂·⟨dY·x̂⟩)``, ``dscale = Σ dY·x̂``, ``dB = Σ dY`` in double."""
    zero = opset18.Cast(opset18.Constant(value=_ZERO_1D), to=_INT64)
    one = opset18.Cast(opset18.Constant(value=_ONE_1D), to=_INT64)
    minus_one = opset18.Cast(opset18.Constant(value=_MINUS_ONE_1D), to=_INT64)
    parameter_shape = opset18.Cast(opset18.Constant(value=_PARAMETER_SHAPE), to=_INT64)
    x_shape = opset18.Shape(X)
    padded_shape = opset18.Concat(x_shape, one, axis=0)
    batch = opset18.Gather(padded_shape, zero)
    channels = opset18.Gather(padded_shape, one)
    ncl_shape = opset18.Concat(batch, channels, minus_one, axis=0)
    x3 = opset18.Reshape(opset18.Cast(X, to=_DOUBLE), ncl_shape)
    dy3 = opset18.Reshape(opset18.Cast(dY, to=_DOUBLE), ncl_shape)
    mean3 = opset18.Reshape(opset18.Cast(saved_mean, to=_DOUBLE), parameter_shape)
    inv_std3 = opset18.Reshape(opset18.Cast(saved_inv_std, to=_DOUBLE), parameter_shape)
    scale3 = opset18.Reshape(opset18.Cast(scale, to=_DOUBLE), parameter_shape)
    normalised = (x3 - mean3) * inv_std3
    mean_dy = BatchMean(dy3)
    mean_dy_normalised = BatchMean(dy3 * normalised)
    dx3 = (scale3 * inv_std3) * (dy3 - mean_dy - normalised * mean_dy_normalised)
    dX = opset18.Cast(opset18.Reshape(dx3, x_shape), to=x_dtype)
    count = opset18.Cast(opset18.Size(X), to=_DOUBLE) / opset18.Cast(channels, to=_DOUBLE)
    scale_shape = opset18.Shape(scale)
    dB = opset18.Cast(opset18.Reshape(mean_dy, scale_shape) * count, to=scale_dtype)
    dscale = opset18.Cast(opset18.Reshape(mean_dy_normalised, scale_shape) * count, to=scale_dtype)
    return dX, dscale, dB


def training_functions(opset: int = REDUCE_MEAN_AXES_INPUT_OPSET) -> tuple[onnx.FunctionProto, ...]:
    """The FunctionProtos a model with default-domain ``opset`` needs: BatchMean, training, gradient.

    Each function imports the default domain at ``opset`` (onnxruntime inlines a function with the model's
    opset, so the two must agree) and ``bnfold`` at version 1. Add them to ``ModelProto.functions`` (IR
    version 8 or later) and import the ``bnfold`` domain at version 1.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MINIMUM_OPSET:
        raise UsageError(f"the bnfold training functions need a default-domain opset >= {MINIMUM_OPSET}, got {opset}")
    mean_source = BatchMean if opset >= REDUCE_MEAN_AXES_INPUT_OPSET else BatchMeanAxesAttribute
    protos = []
    for name, source in (
        (MEAN_FUNCTION, mean_source),
        (TRAINING_FUNCTION, BatchNormalizationTraining),
        (GRADIENT_FUNCTION, BatchNormalizationTrainingGrad),
    ):
        proto = source.to_function_proto()
        proto.name = name
        del proto.opset_import[:]
        proto.opset_import.extend(
            [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
        )
        protos.append(proto)
    return tuple(protos)
