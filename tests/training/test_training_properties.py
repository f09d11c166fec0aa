"""Property-based tests (hypothesis) over shapes, dtypes, momentum and epsilon."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from training_builders import BFLOAT16, relative_error

from bnfold.training import batch_norm_backward, batch_norm_forward

FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))
# Normwise relative error allowed after the single rounding to the output dtype.
ROUNDING = {np.dtype(np.float16): 2e-3, BFLOAT16: 1.6e-2, np.dtype(np.float32): 2e-7, np.dtype(np.float64): 1e-13}

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=5).map(tuple)
training_shapes = shapes.filter(lambda shape: shape[0] * int(np.prod(shape[2:], dtype=np.int64)) >= 2)
unit_interval = st.floats(0.0, 1.0, allow_nan=False)
epsilons = st.floats(1e-6, 1.0, allow_nan=False)
fast = settings(max_examples=40, deadline=None)


def _case(seed: int, shape: tuple[int, ...], x_dtype, param_dtype, stats_dtype, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    channels = 1 if len(shape) == 1 else shape[1]
    x = (offset + 3.0 * rng.standard_normal(shape)).astype(x_dtype)
    scale = rng.uniform(0.5, 2.0, channels).astype(param_dtype)
    bias = rng.standard_normal(channels).astype(param_dtype)
    mean = rng.standard_normal(channels).astype(stats_dtype)
    var = rng.uniform(0.1, 2.0, channels).astype(stats_dtype)
    return x, scale, bias, mean, var


def _by_channel(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    as_ncl = array.reshape(array.shape[0], 1, -1) if array.ndim == 1 else array.reshape(*array.shape[:2], -1)
    return as_ncl.transpose(1, 0, 2).reshape(as_ncl.shape[1], -1)


@fast
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=training_shapes,
    x_dtype=st.sampled_from(FLOAT_DTYPES),
    param_dtype=st.sampled_from(FLOAT_DTYPES),
    stats_dtype=st.sampled_from(FLOAT_DTYPES),
    momentum=unit_interval,
    epsilon=epsilons,
)
def test_training_forward_matches_the_textbook_formula(
    seed, shape, x_dtype, param_dtype, stats_dtype, momentum, epsilon
) -> None:
    x, scale, bias, mean, var = _case(seed, shape, x_dtype, param_dtype, stats_dtype)
    out = batch_norm_forward(x, scale, bias, mean, var, momentum=momentum, epsilon=epsilon)
    assert out.y.dtype == x_dtype and out.y.shape == x.shape
    assert out.running_mean.dtype == stats_dtype and out.running_var.dtype == stats_dtype
    assert out.saved_mean.dtype == (np.float64 if x_dtype == np.float64 else np.float32)

    values = _by_channel(x)
    batch_mean, batch_var = values.mean(axis=1), values.var(axis=1)
    scale64, bias64 = scale.astype(np.float64), bias.astype(np.float64)
    expected_y = (values - batch_mean[:, None]) / np.sqrt(batch_var[:, None] + epsilon) * scale64[:, None]
    expected_y += bias64[:, None]
    assert relative_error(_by_channel(out.y), expected_y) <= ROUNDING[x_dtype] + 1e-12
    expected_mean = mean.astype(np.float64) * momentum + batch_mean * (1 - momentum)
    expected_var = var.astype(np.float64) * momentum + batch_var * (1 - momentum)
    assert relative_error(out.running_mean, expected_mean) <= ROUNDING[stats_dtype] + 1e-12
    assert relative_error(out.running_var, expected_var) <= ROUNDING[stats_dtype] + 1e-12


@fast
@given(seed=st.integers(0, 2**32 - 1), shape=training_shapes, epsilon=epsilons, offset=st.floats(-1e4, 1e4))
def test_normalised_output_has_zero_mean_and_shrunk_unit_variance(seed, shape, epsilon, offset) -> None:
    x, scale, bias, mean, var = _case(seed, shape, np.float64, np.float64, np.float64, offset)
    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=epsilon)
    normalised = (_by_channel(out.y) - bias[:, None]) / scale[:, None]
    batch_var = _by_channel(x).var(axis=1)
    np.testing.assert_allclose(normalised.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(normalised.var(axis=1), batch_var / (batch_var + epsilon), rtol=1e-9, atol=1e-12)


@fast
@given(seed=st.integers(0, 2**32 - 1), shape=training_shapes, epsilon=epsilons, offset=st.floats(-1e3, 1e3))
def test_training_gradients_sum_to_zero_and_match_torch(seed, shape, epsilon, offset) -> None:
    x, scale, bias, mean, var = _case(seed, shape, np.float64, np.float64, np.float64, offset)
    dy = np.random.default_rng(seed + 1).standard_normal(shape)
    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=epsilon)
    grads = batch_norm_backward(dy, x, scale, out.saved_mean, out.saved_inv_std)
    # dx and Σ dx cancel terms of size |scale · inv_std · dy|, and x̂ = (x − mean) · inv_std carries the rounding of
    # x relative to |x|, not to |x − mean|: errors are a few ulps of those sizes, amplified by 1 + |mean| · inv_std.
    inv_std = out.saved_inv_std
    ulps = 64 * np.finfo(np.float64).eps * (1.0 + np.max(np.abs(out.saved_mean) * inv_std))
    count = _by_channel(x).shape[1]
    term_size = np.abs(scale * inv_std) * np.abs(_by_channel(dy)).sum(axis=1)
    assert np.all(np.abs(_by_channel(grads.dx).sum(axis=1)) <= ulps * count * term_size)
    if len(shape) >= 2:
        x_t = torch.tensor(x, requires_grad=True)
        scale_t, bias_t = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
        y_t = F.batch_norm(x_t, None, None, scale_t, bias_t, training=True, eps=epsilon)
        y_t.backward(torch.tensor(dy))
        largest_dy = np.max(np.abs(dy))
        assert np.max(np.abs(grads.dx - x_t.grad.numpy())) <= ulps * np.max(np.abs(scale * inv_std)) * largest_dy
        assert np.max(np.abs(grads.dscale - scale_t.grad.numpy())) <= ulps * count * largest_dy
        assert relative_error(grads.dbias, bias_t.grad.numpy()) <= 1e-12


@fast
@given(seed=st.integers(0, 2**32 - 1), shape=training_shapes.filter(lambda s: len(s) >= 2), momentum=unit_interval)
def test_torch_convention_running_statistics_match_torch(seed, shape, momentum) -> None:
    x, scale, bias, mean, var = _case(seed, shape, np.float64, np.float64, np.float64)
    running_mean_t, running_var_t = torch.tensor(mean), torch.tensor(var)
    F.batch_norm(torch.tensor(x), running_mean_t, running_var_t, training=True, momentum=momentum)
    out = batch_norm_forward(x, scale, bias, mean, var, momentum=momentum, convention="torch")
    assert relative_error(out.running_mean, running_mean_t.numpy()) <= 1e-13
    assert relative_error(out.running_var, running_var_t.numpy()) <= 1e-13


@fast
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=shapes,
    x_dtype=st.sampled_from(FLOAT_DTYPES),
    epsilon=epsilons,
)
def test_inference_mode_leaves_running_statistics_unchanged(seed, shape, x_dtype, epsilon) -> None:
    x, scale, bias, mean, var = _case(seed, shape, x_dtype, np.float32, np.float32)
    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=epsilon, training=False)
    np.testing.assert_array_equal(out.running_mean, mean)
    np.testing.assert_array_equal(out.running_var, var)
    expected = (_by_channel(x) - mean[:, None].astype(np.float64)) / np.sqrt(var[:, None].astype(np.float64) + epsilon)
    expected = expected * scale[:, None] + bias[:, None]
    assert relative_error(_by_channel(out.y), expected) <= ROUNDING[x_dtype] + 1e-12
