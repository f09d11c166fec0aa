"""Recalibration against PyTorch: recovering zoo statistics, and --match-torch against update_bn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

import bnfold
from models.common import single_threaded
from tests.recalibrate.recalibrate_helpers import (
    draw,
    export,
    onnx_statistics,
    set_garbage_statistics,
    torch_module,
    torch_statistics,
    zoo_calibration_batches,
)

# float32 activations from onnxruntime vs torch's float32 training-mode forward: ~1e-6 relative apart.
FLOAT32_RTOL = 2e-5
FLOAT32_ATOL = 2e-5


def _assert_statistics_close(actual: dict, expected: dict, *, rtol: float, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(actual[name][0], mean, rtol=rtol, atol=atol, err_msg=f"{name} mean")
        np.testing.assert_allclose(actual[name][1], var, rtol=rtol, atol=atol, err_msg=f"{name} var")


def test_match_torch_recovers_zoo_statistics_from_garbage() -> None:
    """demo_resnet's statistics came from calibrate_batchnorm (update_bn semantics, 4 batches): replay those
    batches on the exported model with garbage statistics and get them back to float32 accuracy."""
    name = "demo_resnet"
    model = export(torch_module(name), name)
    original = onnx_statistics(model)
    set_garbage_statistics(model)
    assert not np.allclose(onnx_statistics(model)["stem.1"][0], original["stem.1"][0])
    batches = [{"input": batch} for batch in zoo_calibration_batches(name)]

    recalibrated, report = bnfold.recalibrate(model, batches, match_torch=True)

    assert len(report.recalibrated) == 9 and report.passes == 1 and report.batches == 4
    _assert_statistics_close(onnx_statistics(recalibrated), original, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_pooled_recovers_statistics_from_fresh_data_of_the_same_distribution() -> None:
    """Statistics measured by torch on 8×32 samples of N(0.7, 1.5²); garbage; recalibrated (pooled mode) on 8×32
    *other* samples of that distribution. Stated tolerance: |Δmean| ≤ 0.1·std and var within 12 % (observed:
    ≤ 0.03·std and ≤ 5.5 %: sampling noise plus eval-mode vs train-mode upstream normalisation)."""
    name = "demo_resnet"
    module = torch_module(name)
    with single_threaded():
        update_bn([torch.from_numpy(draw((32, 3, 32, 32), seed)) for seed in range(8)], module)
    model = export(module, name)
    reference = onnx_statistics(model)
    set_garbage_statistics(model)

    recalibrated, report = bnfold.recalibrate(model, [{"input": draw((32, 3, 32, 32), 100 + s)} for s in range(8)])

    assert report.mode == "pooled" and report.passes == 7
    measured = onnx_statistics(recalibrated)
    for module_name, (mean, var) in reference.items():
        new_mean, new_var = measured[module_name]
        assert np.max(np.abs(new_mean - mean) / np.sqrt(var)) <= 0.1, module_name
        assert np.max(np.abs(new_var - var) / var) <= 0.12, module_name


@pytest.mark.parametrize(("name", "opset"), [("demo_resnet", 17), ("demo_resnet", 13), ("mlp", 17)])
def test_match_torch_equals_update_bn(name: str, opset: int) -> None:
    """Same torch model, same batches (of unequal sizes): update_bn's buffers == --match-torch's statistics.
    Opset 13 exercises the five-output training form, mlp a rank-2 BatchNorm1d input."""
    module = torch_module(name)
    model = export(module, name, opset=opset)
    sample_shape = tuple(model.graph.inputs[0].shape[1:])
    batches = [
        draw((size, *sample_shape), seed, scale=1.0 + seed, offset=0.3 * seed) for seed, size in enumerate((5, 3, 8))
    ]
    with single_threaded():
        update_bn([torch.from_numpy(batch) for batch in batches], module)

    recalibrated, report = bnfold.recalibrate(model, [{"input": batch} for batch in batches], match_torch=True)

    assert report.mode == "match_torch" and report.convention == "torch"
    _assert_statistics_close(
        onnx_statistics(recalibrated), torch_statistics(module), rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL
    )


def test_match_torch_differs_from_pooled_when_batches_differ() -> None:
    """The two modes are not the same thing: with batches of shifted means, pooled statistics include the
    between-batch variance that update_bn's average of per-batch variances leaves out. Per channel, with
    k batches of n and N = k·n: pooled·(N−1)/N = mean of biased per-batch variances + variance of the batch
    means ≥ update_bn·(n−1)/n, with equality only when the batch means agree."""
    name = "mlp"
    batches = [{"input": draw((16, 64), seed, scale=1.0, offset=3.0 * seed)} for seed in range(3)]
    pooled, _ = bnfold.recalibrate(export(torch_module(name), name), batches, convention="torch")
    torch_like, _ = bnfold.recalibrate(export(torch_module(name), name), batches, match_torch=True)
    first_pooled, first_torch = onnx_statistics(pooled)["1"], onnx_statistics(torch_like)["1"]
    np.testing.assert_allclose(first_pooled[0], first_torch[0], rtol=1e-5, atol=1e-5)  # equal-size batches
    pooled_biased, torch_biased = first_pooled[1] * (47 / 48), first_torch[1] * (15 / 16)
    assert np.all(pooled_biased >= torch_biased * (1 - 1e-5))
    assert np.max(pooled_biased / torch_biased) > 10
