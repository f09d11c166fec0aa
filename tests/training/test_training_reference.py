"""The numpy reference: PyTorch autograd in float64, finite differences, conventions, dtypes, edge cases."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_builders import BFLOAT16, assert_relative, relative_error

from bnfold.errors import UsageError
from bnfold.training import (
    InferenceGradients,
    TrainingGradients,
    batch_norm_backward,
    batch_norm_forward,
    batch_statistics,
    inverse_std,
)

SHAPES_BY_RANK = {2: (6, 3), 3: (4, 3, 5), 4: (3, 4, 3, 2), 5: (2, 3, 2, 3, 2)}


def _parameters(rng: np.random.Generator, channels: int, dtype=np.float64):
    return (
        rng.uniform(0.5, 2.0, channels).astype(dtype),
        rng.standard_normal(channels).astype(dtype),
        rng.standard_normal(channels).astype(dtype),
        rng.uniform(0.5, 2.0, channels).astype(dtype),
    )


@pytest.mark.parametrize("rank", sorted(SHAPES_BY_RANK))
def test_torch_convention_matches_torch_autograd_in_float64(rank: int) -> None:
    rng = np.random.default_rng(rank)
    shape = SHAPES_BY_RANK[rank]
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    scale, bias, mean, var = _parameters(rng, shape[1])
    dy = rng.standard_normal(shape)

    x_t = torch.tensor(x, requires_grad=True)
    scale_t, bias_t = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
    running_mean_t, running_var_t = torch.tensor(mean), torch.tensor(var)
    y_t = F.batch_norm(x_t, running_mean_t, running_var_t, scale_t, bias_t, training=True, momentum=0.1, eps=1e-5)
    y_t.backward(torch.tensor(dy))

    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=1e-5, convention="torch")
    grads = batch_norm_backward(dy, x, scale, out.saved_mean, out.saved_inv_std)
    assert_relative(out.y, y_t.detach().numpy(), 1e-12)
    assert_relative(out.running_mean, running_mean_t.numpy(), 1e-12)
    assert_relative(out.running_var, running_var_t.numpy(), 1e-12)
    assert_relative(grads.dx, x_t.grad.numpy(), 1e-12)
    assert_relative(grads.dscale, scale_t.grad.numpy(), 1e-12)
    assert_relative(grads.dbias, bias_t.grad.numpy(), 1e-12)


@pytest.mark.parametrize("rank", sorted(SHAPES_BY_RANK))
def test_onnx_convention_running_stats_follow_the_onnx_formula(rank: int) -> None:
    rng = np.random.default_rng(10 + rank)
    shape = SHAPES_BY_RANK[rank]
    x = rng.standard_normal(shape)
    scale, bias, mean, var = _parameters(rng, shape[1])
    axes = tuple(i for i in range(len(shape)) if i != 1)
    out = batch_norm_forward(x, scale, bias, mean, var, momentum=0.8, epsilon=1e-3)
    batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
    assert_relative(out.running_mean, mean * 0.8 + batch_mean * (1 - 0.8), 1e-14)
    assert_relative(out.running_var, var * 0.8 + batch_var * (1 - 0.8), 1e-14)
    broadcast = (1, -1) + (1,) * (len(shape) - 2)
    expected_y = (x - batch_mean.reshape(broadcast)) / np.sqrt(batch_var.reshape(broadcast) + 1e-3)
    assert_relative(out.y, expected_y * scale.reshape(broadcast) + bias.reshape(broadcast), 1e-13)


def test_conventions_differ_by_the_unbiased_variance_only() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 4))
    scale, bias, mean, var = _parameters(rng, 2)
    onnx_out = batch_norm_forward(x, scale, bias, mean, var, momentum=0.9, convention="onnx")
    torch_out = batch_norm_forward(x, scale, bias, mean, var, momentum=0.1, convention="torch")
    count = 5 * 4
    _, batch_var = batch_statistics(x)
    np.testing.assert_array_equal(onnx_out.y, torch_out.y)
    assert_relative(onnx_out.running_mean, torch_out.running_mean, 1e-15)
    assert_relative(torch_out.running_var - onnx_out.running_var, 0.1 * batch_var / (count - 1), 1e-12)


def test_default_momentum_depends_on_the_convention() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3))
    scale, bias, mean, var = _parameters(rng, 3)
    batch_mean, _ = batch_statistics(x)
    onnx_out = batch_norm_forward(x, scale, bias, mean, var)
    torch_out = batch_norm_forward(x, scale, bias, mean, var, convention="torch")
    np.testing.assert_allclose(onnx_out.running_mean, 0.9 * mean + 0.1 * batch_mean, rtol=1e-15)
    np.testing.assert_allclose(torch_out.running_mean, 0.9 * mean + 0.1 * batch_mean, rtol=1e-15)


def test_momentum_none_is_torch_cumulative_moving_average() -> None:
    rng = np.random.default_rng(3)
    module = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    module.train()
    running_mean = module.running_mean.numpy().copy()
    running_var = module.running_var.numpy().copy()
    weight, bias = module.weight.detach().numpy(), module.bias.detach().numpy()
    for step in range(3):
        x = rng.standard_normal((4, 3, 2, 2)) + step
        count_before = int(module.num_batches_tracked)
        out = batch_norm_forward(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            momentum=None,
            convention="torch",
            num_batches_tracked=count_before,
        )
        module(torch.tensor(x))
        running_mean, running_var = out.running_mean, out.running_var
        assert_relative(running_mean, module.running_mean.numpy(), 1e-14)
        assert_relative(running_var, module.running_var.numpy(), 1e-14)
    assert int(module.num_batches_tracked) == 3


def test_inference_mode_uses_the_given_statistics() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 5)).astype(np.float32)
    scale, bias, mean, var = (array.astype(np.float32) for array in _parameters(rng, 2))
    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=1e-2, training=False)
    expected = (x - mean[:, None]) / np.sqrt(var[:, None].astype(np.float64) + 1e-2) * scale[:, None] + bias[:, None]
    assert_relative(out.y, expected, 1e-7)
    np.testing.assert_array_equal(out.running_mean, mean)
    np.testing.assert_array_equal(out.running_var, var)
    assert out.running_mean is not mean
    np.testing.assert_allclose(out.saved_inv_std, inverse_std(var, 1e-2).astype(np.float32))


def test_training_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 4))
    scale, bias, mean, var = _parameters(rng, 2)
    weights = rng.standard_normal(x.shape)

    def loss(x_, scale_, bias_) -> float:
        return float(np.sum(weights * batch_norm_forward(x_, scale_, bias_, mean, var, epsilon=1e-3).y))

    out = batch_norm_forward(x, scale, bias, mean, var, epsilon=1e-3)
    grads = batch_norm_backward(weights, x, scale, out.saved_mean, out.saved_inv_std)
    assert isinstance(grads, TrainingGradients)
    for index, (array, analytic) in enumerate(((x, grads.dx), (scale, grads.dscale), (bias, grads.dbias))):
        numeric = _central_differences(lambda a, i=index: loss(*_replace((x, scale, bias), i, a)), array)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_inference_gradients_match_finite_differences_and_torch() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 2, 4))
    scale, bias, mean, var = _parameters(rng, 2)
    epsilon = 1e-3
    weights = rng.standard_normal(x.shape)
    grads = batch_norm_backward(weights, x, scale, mean, inverse_std(var, epsilon), training=False)
    assert isinstance(grads, InferenceGradients)

    def loss(*arrays) -> float:
        return float(np.sum(weights * batch_norm_forward(*arrays, epsilon=epsilon, training=False).y))

    arrays = (x, scale, bias, mean, var)
    for index, analytic in enumerate(grads):
        numeric = _central_differences(lambda a, i=index: loss(*_replace(arrays, i, a)), arrays[index])
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)

    tensors = [torch.tensor(array, requires_grad=True) for array in arrays]
    x_t, scale_t, bias_t, mean_t, var_t = tensors
    y_t = (x_t - mean_t[:, None]) / torch.sqrt(var_t[:, None] + epsilon) * scale_t[:, None] + bias_t[:, None]
    y_t.backward(torch.tensor(weights))
    for analytic, tensor in zip(grads, tensors, strict=True):
        assert_relative(analytic, tensor.grad.numpy(), 1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 7), (2, 3, 2, 2, 2), (9,)])
def test_training_gradient_of_x_sums_to_zero_per_channel(shape) -> None:
    rng = np.random.default_rng(7)
    x = 100.0 + rng.standard_normal(shape)
    channels = 1 if len(shape) == 1 else shape[1]
    scale, bias, mean, var = _parameters(rng, channels)
    out = batch_norm_forward(x, scale, bias, mean, var)
    dx = batch_norm_backward(rng.standard_normal(shape), x, scale, out.saved_mean, out.saved_inv_std).dx
    by_channel = dx.reshape(shape[0], channels, -1)
    sums = by_channel.sum(axis=(0, 2))
    magnitudes = np.abs(by_channel).sum(axis=(0, 2))
    assert np.all(np.abs(sums) <= 1e-13 * magnitudes), sums


def test_cancellation_mean_1e6_std_1_holds_where_naive_formula_fails() -> None:
    rng = np.random.default_rng(8)
    x = (1e6 + rng.standard_normal((64, 2, 32, 32))).astype(np.float32)
    values = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    exact_mean = np.array([_exact_mean(row) for row in values])
    exact_var = np.array([_exact_mean((row - m) ** 2) for row, m in zip(values, exact_mean, strict=True)])
    mean, var = batch_statistics(x)
    assert relative_error(mean, exact_mean) <= 1e-12
    assert np.all(np.abs(var - exact_var) <= 1e-5 * exact_var)
    # E[x²] − E[x]² accumulated in float32 (what onnxruntime's CPU kernel effectively does) is useless here,
    # and even in float64 it misses 1e-5 relative.
    naive32 = np.mean(x * x, axis=(0, 2, 3), dtype=np.float32) - np.mean(x, axis=(0, 2, 3), dtype=np.float32) ** 2
    assert np.all(np.abs(naive32 - exact_var) > 1e-5 * exact_var)
    x64 = x.astype(np.float64)
    naive64 = np.mean(x64 * x64, axis=(0, 2, 3)) - np.mean(x64, axis=(0, 2, 3)) ** 2
    assert np.any(np.abs(naive64 - exact_var) > 1e-5 * exact_var)
    y = batch_norm_forward(x.astype(np.float64), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), epsilon=0.0).y
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1.0, rtol=1e-12)


def test_reduces_1e7_elements_per_channel_exactly() -> None:
    rng = np.random.default_rng(9)
    steps = rng.integers(-64, 65, size=10_000_000)
    x = (1000.0 + steps / 8.0).astype(np.float32).reshape(10, 1, 1_000_000)  # exactly representable values
    total, total_squares, count = int(steps.sum()), int((steps * steps).sum()), steps.size
    exact_mean = 1000.0 + total / (8.0 * count)
    exact_var = (total_squares * count - total * total) / (64.0 * count * count)
    mean, var = batch_statistics(x)
    assert relative_error(mean, [exact_mean]) <= 1e-15
    assert relative_error(var, [exact_var]) <= 1e-12
    out = batch_norm_forward(
        x,
        np.ones(1, np.float32),
        np.zeros(1, np.float32),
        np.zeros(1, np.float32),
        np.ones(1, np.float32),
        momentum=0.0,
        epsilon=0.0,
    )
    assert out.running_mean.dtype == np.float32
    assert relative_error(out.running_var, [exact_var]) <= 1e-7


@pytest.mark.parametrize(
    ("x_dtype", "stats_dtype", "saved_dtype"),
    [
        (np.float16, np.float32, np.float32),
        (BFLOAT16, np.float32, np.float32),
        (np.float32, np.float16, np.float32),
        (np.float64, np.float32, np.float64),
        (BFLOAT16, BFLOAT16, np.float32),
    ],
)
def test_output_dtypes_follow_opset_15_rules(x_dtype, stats_dtype, saved_dtype) -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 2, 3)).astype(x_dtype)
    scale, bias = rng.standard_normal(2).astype(np.float64), rng.standard_normal(2).astype(np.float64)
    mean, var = np.zeros(2, stats_dtype), np.ones(2, stats_dtype)
    out = batch_norm_forward(x, scale, bias, mean, var)
    assert out.y.dtype == np.dtype(x_dtype)
    assert out.running_mean.dtype == np.dtype(stats_dtype)
    assert out.running_var.dtype == np.dtype(stats_dtype)
    assert out.saved_mean.dtype == np.dtype(saved_dtype)
    assert out.saved_inv_std.dtype == np.dtype(saved_dtype)


def test_float16_statistics_accumulate_wider_than_float16() -> None:
    # 4096 values 1000 and 1001 (exact in float16): a float16 sum overflows, the float64 one is exact.
    x = np.full((4096, 1), 1000.0, dtype=np.float16)
    x[::2] += np.float16(1.0)
    mean, var = batch_statistics(x)
    assert mean[0] == 1000.5
    assert var[0] == 0.25
    with np.errstate(over="ignore"):
        assert np.isinf(np.sum(x, dtype=np.float16))  # a float16 accumulator overflows


def test_one_element_per_channel_gives_bias_in_onnx_convention() -> None:
    x = np.array([[3.0, -2.0]])
    out = batch_norm_forward(x, np.array([2.0, 5.0]), np.array([0.5, -1.0]), np.zeros(2), np.ones(2), momentum=0.9)
    np.testing.assert_array_equal(out.y, [[0.5, -1.0]])
    np.testing.assert_allclose(out.running_var, [0.9, 0.9], rtol=1e-15)
    np.testing.assert_allclose(out.running_mean, [0.1 * 3.0, 0.1 * -2.0], rtol=1e-15)


def test_one_element_per_channel_is_refused_in_torch_convention() -> None:
    with pytest.raises(UsageError, match=r"more than 1 value per channel in training mode .* got 1"):
        batch_norm_forward(np.ones((1, 2)), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), convention="torch")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(torch.ones(1, 2), torch.zeros(2), torch.ones(2), training=True)


def test_zero_variance_with_zero_epsilon_is_nan_in_that_channel_only() -> None:
    x = np.stack([np.full(6, 0.1), np.arange(6.0)], axis=1)  # channel 0 constant (0.1 is inexact in binary)
    out = batch_norm_forward(x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), epsilon=0.0)
    assert np.all(np.isnan(out.y[:, 0]))
    assert np.all(np.isfinite(out.y[:, 1]))
    assert out.saved_mean[0] == 0.1  # the corrected mean is exact, so x − mean is exactly 0
    assert np.isinf(out.saved_inv_std[0])
    assert np.all(np.isfinite(out.running_mean)) and np.all(np.isfinite(out.running_var))
    assert out.running_var[0] == 0.9
    with_epsilon = batch_norm_forward(x, np.ones(2), np.array([7.0, 0.0]), np.zeros(2), np.ones(2), epsilon=1e-5)
    np.testing.assert_array_equal(with_epsilon.y[:, 0], 7.0)


def test_nan_stays_in_its_channel() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 5))
    x[2, 1, 3] = np.nan
    scale, bias, mean, var = _parameters(rng, 3)
    out = batch_norm_forward(x, scale, bias, mean, var)
    assert np.all(np.isnan(out.y[:, 1]))
    assert np.isnan(out.running_mean[1]) and np.isnan(out.running_var[1])
    clean = batch_norm_forward(np.delete(x, 1, axis=1), *(np.delete(a, 1) for a in (scale, bias, mean, var)))
    np.testing.assert_array_equal(np.delete(out.y, 1, axis=1), clean.y)
    dx = batch_norm_backward(np.ones_like(x), x, scale, out.saved_mean, out.saved_inv_std).dx
    assert np.all(np.isnan(dx[:, 1])) and np.all(np.isfinite(np.delete(dx, 1, axis=1)))


def test_one_dimensional_input_is_one_channel() -> None:
    x = np.array([1.0, 2.0, 4.0, 9.0])
    out = batch_norm_forward(x, np.array([2.0]), np.array([1.0]), np.zeros(1), np.ones(1), epsilon=0.0)
    column = batch_norm_forward(x[:, None], np.array([2.0]), np.array([1.0]), np.zeros(1), np.ones(1), epsilon=0.0)
    assert out.y.shape == (4,)
    np.testing.assert_array_equal(out.y, column.y[:, 0])
    np.testing.assert_allclose(out.saved_mean, [4.0])
    grads = batch_norm_backward(np.ones(4), x, np.array([2.0]), out.saved_mean, out.saved_inv_std)
    assert grads.dx.shape == (4,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"convention": "keras"}, "convention must be 'onnx' or 'torch'"),
        ({"momentum": None}, "momentum=None .* only with convention='torch'"),
        ({"momentum": None, "convention": "torch"}, "needs num_batches_tracked"),
        ({"num_batches_tracked": 3}, "only applies to convention='torch'"),
        ({"momentum": None, "convention": "torch", "num_batches_tracked": -1}, "num_batches_tracked must be >= 0"),
        ({"momentum": None, "convention": "torch", "num_batches_tracked": 1.5}, "num_batches_tracked must be an int"),
        ({"epsilon": -1e-5}, "epsilon must be >= 0"),
        ({"x": np.ones((4, 3), np.int32)}, "x must be float16, bfloat16, float32 or float64, got int32"),
        ({"scale": np.ones(2)}, r"scale must have shape \(3,\) \(one value per channel\), got \(2,\)"),
        ({"x": np.float64(1.0)}, "x must have at least 1 dimension"),
        ({"x": np.zeros((0, 3))}, r"at least one element per channel; x has shape \(0, 3\)"),
    ],
)
def test_invalid_forward_arguments_raise_usage_error(options: dict, message: str) -> None:
    arguments = {"x": np.ones((4, 3)), "scale": np.ones(3), "bias": np.zeros(3), "mean": np.zeros(3), "var": np.ones(3)}
    positional = {name: options.pop(name, arguments[name]) for name in list(arguments)}
    with pytest.raises(UsageError, match=message):
        batch_norm_forward(*positional.values(), **options)


def test_backward_refuses_dy_of_another_shape() -> None:
    with pytest.raises(UsageError, match=r"dy must have x's shape \(4, 3\), got \(2, 3\)"):
        batch_norm_backward(np.ones((2, 3)), np.ones((4, 3)), np.ones(3), np.zeros(3), np.ones(3))


def test_empty_batch_is_fine_in_inference_mode() -> None:
    out = batch_norm_forward(np.zeros((0, 3, 2)), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=False)
    assert out.y.shape == (0, 3, 2)


def test_bfloat16_input_matches_float64_reference_after_one_rounding() -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 2, 4)).astype(ml_dtypes.bfloat16)
    params = _parameters(rng, 2)
    out = batch_norm_forward(x, *params)
    exact = batch_norm_forward(x.astype(np.float64), *params)
    np.testing.assert_array_equal(out.y, exact.y.astype(ml_dtypes.bfloat16))


def _central_differences(function, array: np.ndarray, step: float = 1e-6) -> np.ndarray:
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        plus, minus = array.copy(), array.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (function(plus) - function(minus)) / (2 * step)
    return gradient


def _replace(arrays: tuple, index: int, value: np.ndarray) -> tuple:
    return tuple(value if i == index else array for i, array in enumerate(arrays))


def _exact_mean(values: np.ndarray) -> float:
    return math.fsum(values.tolist()) / values.size
