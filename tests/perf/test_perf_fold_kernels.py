"""The blocked float64 fold arithmetic is bit-identical to the whole-array one; the pass's ``on_folded`` hook."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from perf_model_factory import conv_bn_chain

from bnfold import io
from bnfold.passes import FoldBatchNormPass, Skip, SkipReason
from bnfold.passes import rule as rule_module
from bnfold.passes.rule import cast_checked, cast_scaled_checked
from bnfold.report import BatchNormRecord, FoldStatus


def _reference(values: np.ndarray, row_scale: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return np.multiply(values, row_scale, dtype=np.float64).astype(dtype.numpy())


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so that small arrays take the blocked path with several blocks."""
    monkeypatch.setattr(rule_module, "BLOCK_BYTES", 256)


@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [
        ((37, 5, 3, 3), (37, 1, 1, 1)),  # Conv: one scale per output row
        ((64, 48), (1, 48)),  # Gemm transB=0 / MatMul: one scale per column
        ((48, 64), (48, 1)),  # Gemm transB=1: one scale per row
        ((64, 48), (48,)),  # MatMul's 1-D scale
        ((1, 300), (1, 300)),  # a single row
    ],
)
@pytest.mark.parametrize("source_dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_blocked_product_is_bit_identical(small_blocks, shape, scale_shape, source_dtype) -> None:
    rng = np.random.default_rng(7)
    values = (rng.standard_normal(shape) * 3).astype(source_dtype)
    row_scale = rng.uniform(0.25, 4.0, scale_shape)
    dtype = ir.DataType.from_numpy(np.dtype(source_dtype))
    blocked = cast_scaled_checked(values, row_scale, dtype, "weight")
    expected = _reference(values, row_scale, dtype)
    assert blocked.dtype == expected.dtype and blocked.shape == expected.shape
    assert _bits(blocked) == _bits(expected)


def test_large_weight_takes_several_blocks_and_stays_bit_identical() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((96, 64, 3, 3)).astype(np.float32)  # 96 rows of 4.5 KiB float64: 5 blocks of 1 MiB
    row_scale = rng.uniform(0.5, 1.5, (96, 1, 1, 1))
    blocked = cast_checked(values, ir.DataType.FLOAT, "weight", row_scale)
    assert _bits(blocked) == _bits(_reference(values, row_scale, ir.DataType.FLOAT))


def test_blocked_overflow_reports_the_same_largest_value(small_blocks) -> None:
    values = np.ones((40, 4), dtype=np.float16)
    row_scale = np.full((40, 1), 2.0)
    row_scale[5], row_scale[30] = 70000.0, 90000.0  # the largest lies in a later block than the first overflow
    with pytest.raises(Skip) as blocked:
        cast_scaled_checked(values, row_scale, ir.DataType.FLOAT16, "input 1 of Conv")
    with pytest.raises(Skip) as whole:
        cast_checked(np.multiply(values, row_scale, dtype=np.float64), ir.DataType.FLOAT16, "input 1 of Conv")
    assert blocked.value.reason == whole.value.reason == SkipReason.FOLDED_WEIGHTS_OVERFLOW
    assert (
        blocked.value.detail
        == whole.value.detail
        == "folded input 1 of Conv reaches 90000, beyond the FLOAT16 maximum 65504"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_blocked_non_finite_is_skipped(small_blocks, bad: float) -> None:
    values = np.ones((40, 4), dtype=np.float32)
    row_scale = np.ones((40, 1))
    row_scale[20] = bad
    with pytest.raises(Skip) as caught:
        cast_scaled_checked(values, row_scale, ir.DataType.FLOAT, "weight")
    assert caught.value.reason == SkipReason.FOLDED_WEIGHTS_NOT_FINITE


def test_on_folded_is_called_once_per_folded_bn_with_the_rewritten_producer(tmp_path: Path) -> None:
    model = io.load_model(conv_bn_chain(tmp_path / "chain.onnx", layers=3, channels=2, kernel=1))
    calls: list[tuple[BatchNormRecord, tuple[ir.Node, ...]]] = []
    result = FoldBatchNormPass(on_folded=lambda record, nodes: calls.append((record, nodes)))(model)
    assert [record.node for record, _ in calls] == ["bn0", "bn1", "bn2"]
    assert all(record.status == FoldStatus.FOLDED for record, _ in calls)
    assert [[node.name for node in nodes] for _, nodes in calls] == [["conv0"], ["conv1"], ["conv2"]]
    assert [record for record, _ in calls] == list(result.report.records)


def test_on_folded_is_not_called_for_a_skipped_bn(tmp_path: Path) -> None:
    model = io.load_model(conv_bn_chain(tmp_path / "chain.onnx", layers=2, channels=2, kernel=1))
    calls: list[str] = []
    result = FoldBatchNormPass(
        skip=["conv", "forward_conv"], on_folded=lambda record, nodes: calls.append(record.node)
    )(model)
    assert calls == []
    assert [record.reason for record in result.report.records] == [SkipReason.RULE_DISABLED] * 2
