"""The blocked float64 fold arithmetic is bit-identical to the whole-array one; the pass's ``on_folded`` hook."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from perf_model_factory import conv_bn_chain

import bnfold
from bnfold.files import writer
from bnfold.files.load import load_model
from bnfold.passes import FoldBatchNormPass, Skip, SkipReason
from bnfold.passes import casting as casting_module
from bnfold.passes.casting import ScaledWeight, cast_checked, cast_scaled_checked, product_range
from bnfold.report import BatchNormRecord, FoldStatus
from bnfold.workflow import stage_fold


def _reference(values: np.ndarray, row_scale: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return np.multiply(values, row_scale, dtype=np.float64).astype(dtype.numpy())


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so that small arrays take the blocked path with several blocks."""
    monkeypatch.setattr(casting_module, "BLOCK_BYTES", 256)


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
    model = load_model(conv_bn_chain(tmp_path / "chain.onnx", layers=3, channels=2, kernel=1))
    calls: list[tuple[BatchNormRecord, tuple[ir.Node, ...]]] = []
    result = FoldBatchNormPass(on_folded=lambda record, nodes: calls.append((record, nodes)))(model)
    assert [record.node for record, _ in calls] == ["bn0", "bn1", "bn2"]
    assert all(record.status == FoldStatus.FOLDED for record, _ in calls)
    assert [[node.name for node in nodes] for _, nodes in calls] == [["conv0"], ["conv1"], ["conv2"]]
    assert [record for record, _ in calls] == list(result.report.records)


def test_on_folded_is_not_called_for_a_skipped_bn(tmp_path: Path) -> None:
    model = load_model(conv_bn_chain(tmp_path / "chain.onnx", layers=2, channels=2, kernel=1))
    calls: list[str] = []
    result = FoldBatchNormPass(
        skip=["conv", "forward_conv"], on_folded=lambda record, nodes: calls.append(record.node)
    )(model)
    assert calls == []
    assert [record.reason for record in result.report.records] == [SkipReason.RULE_DISABLED] * 2


# --- deferred weights (ScaledWeight): range checked up front, product computed when read or written -----------


@pytest.fixture
def deferred_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defer weights from 1 KiB and use blocks of a few rows, so small arrays take the deferred path."""
    monkeypatch.setattr(casting_module, "BLOCK_BYTES", 256)
    monkeypatch.setattr(casting_module, "DEFERRED_BYTES", 1024)


@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [((37, 5, 3, 3), (37, 1, 1, 1)), ((64, 48), (1, 48)), ((48, 64), (48, 1)), ((64, 48), (48,))],
)
@pytest.mark.parametrize("source_dtype", [np.float32, np.float16, np.float64])
def test_deferred_weight_is_bit_identical_read_whole_or_in_blocks(
    deferred_small, shape, scale_shape, source_dtype
) -> None:
    rng = np.random.default_rng(11)
    values = (rng.standard_normal(shape) * 3).astype(source_dtype)
    row_scale = rng.uniform(-4.0, 4.0, scale_shape)  # negative scales too
    dtype = ir.DataType.from_numpy(np.dtype(source_dtype))
    weight = cast_scaled_checked(values, row_scale, dtype, "weight")
    assert isinstance(weight, ScaledWeight)
    expected = _reference(values, row_scale, dtype)
    assert weight.shape == expected.shape and weight.dtype == expected.dtype and weight.nbytes == expected.nbytes
    assert _bits(np.asarray(weight)) == _bits(expected)
    rows = max(1, weight.shape[0] // 3)  # several blocks, the last one shorter
    buffer = np.empty(rows * (weight.nbytes // weight.shape[0]), dtype=np.uint8)
    assert b"".join(block.tobytes() for block in weight.blocks(buffer, rows)) == _bits(expected)
    assert _bits(ir.Tensor(weight, dtype=dtype).numpy()) == _bits(expected)


def test_small_or_unusual_weights_are_computed_at_once() -> None:
    values = np.ones((8, 4), dtype=np.float32)  # below DEFERRED_BYTES
    assert isinstance(cast_scaled_checked(values, np.ones((8, 1)), ir.DataType.FLOAT, "w"), np.ndarray)
    bf16 = np.ones((4096, 1024), dtype=ml_dtypes.bfloat16)  # 8 MiB, but not a numpy-native float: immediate path
    assert isinstance(cast_scaled_checked(bf16, np.ones((4096, 1)), ir.DataType.BFLOAT16, "w"), np.ndarray)


@pytest.mark.parametrize("scale_shape", [(40, 1), (1, 6), (6,)])
def test_product_range_equals_the_elementwise_extremes(scale_shape) -> None:
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((40, 6)) * 1e3).astype(np.float32)
    row_scale = rng.uniform(-3.0, 3.0, scale_shape)
    row_scale.flat[0] = 0.0
    products = np.multiply(values, row_scale, dtype=np.float64)
    assert product_range(values, row_scale) == (float(products.max()), float(products.min()))


@pytest.mark.parametrize(
    ("value", "scale"), [(np.nan, 1.0), (np.inf, 2.0), (-np.inf, -1.0), (np.inf, 0.0), (1.0, np.nan), (1.0, np.inf)]
)
def test_deferred_non_finite_product_is_skipped(deferred_small, value: float, scale: float) -> None:
    values = np.ones((40, 8), dtype=np.float32)
    values[17, 3] = value
    row_scale = np.ones((40, 1))
    row_scale[17] = scale
    with pytest.raises(Skip) as caught:
        cast_scaled_checked(values, row_scale, ir.DataType.FLOAT, "weight")
    assert caught.value.reason == SkipReason.FOLDED_WEIGHTS_NOT_FINITE


def test_deferred_overflow_reports_the_same_largest_value(deferred_small) -> None:
    values = np.ones((40, 16), dtype=np.float16)
    values[30, 2] = -2.0
    row_scale = np.full((40, 1), 2.0)
    row_scale[5], row_scale[30] = 70000.0, -45000.0  # the largest magnitude is a negative product: -90000
    with pytest.raises(Skip) as deferred:
        cast_scaled_checked(values, row_scale, ir.DataType.FLOAT16, "input 1 of Conv")
    assert deferred.value.reason == SkipReason.FOLDED_WEIGHTS_OVERFLOW
    assert deferred.value.detail == "folded input 1 of Conv reaches 90000, beyond the FLOAT16 maximum 65504"


def test_streamed_fold_writes_deferred_weights_bit_identical_to_a_whole_array_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = conv_bn_chain(tmp_path / "chain.onnx", layers=3, channels=16, kernel=3)
    monkeypatch.setattr(casting_module, "DEFERRED_BYTES", 1 << 40)
    whole, _ = bnfold.fold(source)
    monkeypatch.setattr(casting_module, "DEFERRED_BYTES", 1024)
    monkeypatch.setattr(casting_module, "BLOCK_BYTES", 512)
    streamed: list[ScaledWeight] = []
    write_blocks = writer.OutputFile.write_blocks
    monkeypatch.setattr(writer.OutputFile, "write_blocks", lambda self, w: (streamed.append(w), write_blocks(self, w)))
    staged = stage_fold(source, tmp_path / "out.onnx", external_data=True)
    assert len(streamed) == 3  # every folded weight was computed block by block while being written
    with staged.staged as files:
        files.commit()
    folded = load_model(tmp_path / "out.onnx")
    for name, value in whole.graph.initializers.items():
        assert _bits(folded.graph.initializers[name].const_value.numpy()) == _bits(value.const_value.numpy()), name


def test_block_rows_make_whole_pages_for_direct_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(casting_module, "STREAM_BLOCK_BYTES", 1 << 16)
    weight = ScaledWeight(np.zeros((512, 512, 3, 3), np.float32), np.ones((512, 1, 1, 1)), np.float32)  # 18 KiB rows
    rows = weight.block_rows(4096)
    assert rows % 2 == 0 and rows * 18432 % 4096 == 0 and rows * 18432 <= 1 << 16
    assert weight.block_rows() == (1 << 16) // 18432  # without alignment: just whole rows
    odd = ScaledWeight(np.zeros((3, 5), np.float32), np.ones((3, 1)), np.float32)  # 20-byte rows, 3 of them
    assert odd.block_rows(4096) == 3  # fewer rows than one aligned unit: one block (its tail is not aligned)


def _fold_with_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool) -> tuple[int, list[int]]:
    """Fold a chain with deferred weights written by direct I/O; return (direct writes, descriptors refused)."""
    source = conv_bn_chain(tmp_path / "chain.onnx", layers=3, channels=16, kernel=3)
    monkeypatch.setattr(casting_module, "DEFERRED_BYTES", 1024)
    monkeypatch.setattr(casting_module, "BLOCK_BYTES", 512)
    monkeypatch.setattr(writer, "ALIGN_THRESHOLD_BYTES", 1024)  # these small weights get page-aligned offsets
    direct_writes, refused = [0], []
    pwrite = os.pwrite

    def counting_pwrite(descriptor: int, data, offset: int) -> int:
        if descriptor in opened:
            if refuse:
                refused.append(descriptor)
                opened.discard(descriptor)  # bnfold closes it; its number may be reused for another file
                raise OSError(errno.EINVAL, "direct I/O refused")
            direct_writes[0] += 1
        return pwrite(descriptor, data, offset)

    opened: set[int] = set()
    open_direct = writer._open_direct
    monkeypatch.setattr(writer, "_open_direct", lambda path: (fd := open_direct(path), opened.add(fd))[0])
    monkeypatch.setattr(writer.os, "pwrite", counting_pwrite)
    staged = stage_fold(source, tmp_path / "out.onnx", external_data=True)
    with staged.staged as files:
        files.commit()
    monkeypatch.undo()
    whole, _ = bnfold.fold(source)
    folded = load_model(tmp_path / "out.onnx")
    for name, value in whole.graph.initializers.items():
        assert _bits(folded.graph.initializers[name].const_value.numpy()) == _bits(value.const_value.numpy()), name
    return direct_writes[0], refused


def _skip_without_direct_io(directory: Path) -> None:
    probe = directory / "probe"
    probe.touch()
    descriptor = writer._open_direct(probe)
    if descriptor < 0:
        pytest.skip(f"no O_DIRECT on this platform or the file system of {directory}")
    os.close(descriptor)


def test_deferred_weights_are_written_with_direct_io_bit_identical(tmp_path: Path, monkeypatch) -> None:
    _skip_without_direct_io(tmp_path)
    direct_writes, refused = _fold_with_direct_io(tmp_path, monkeypatch, refuse=False)
    assert direct_writes == 3 and refused == []  # one aligned block per weight (9 KiB: 8 KiB direct + 1 KiB tail)


def test_refused_direct_io_falls_back_to_the_page_cache_bit_identical(tmp_path: Path, monkeypatch) -> None:
    _skip_without_direct_io(tmp_path)
    direct_writes, refused = _fold_with_direct_io(tmp_path, monkeypatch, refuse=True)
    assert direct_writes == 0 and len(refused) == 1  # refused once, then never tried again for that file
