"""BatchNormalization → MatMul with a 2-D constant weight: the forward fold, its shift in an Add after the MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from forward_torch import EXPORTERS, fold_torch, torch_or_skip
from onnx import helper, numpy_helper
from rules_helpers import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_equivalent,
    assert_folded,
    assert_skipped,
    bn_arrays,
    bn_node,
    fold_proto,
    io,
    make_model,
    only_record,
    op_types,
)

from bnfold.passes import SkipReason

N, K, F = 3, 4, 5


def bn_matmul(
    *, dtype=np.float32, add: tuple[int, ...] | None = None, constant_first: bool = False, seed: int = 0
) -> onnx.ModelProto:
    """``X → Relu → BN → MatMul(W[K, F]) [→ Add(c)]``; ``add`` is the shape of ``c`` (None: no Add)."""
    rng = np.random.default_rng(seed)
    arrays = {"W": (rng.standard_normal((K, F)) * 0.5).astype(dtype), **bn_arrays(K, dtype, seed=seed)}
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        bn_node("r", "bn_out"),
        helper.make_node("MatMul", ["bn_out", "W"], ["m" if add is not None else "Y"], name="matmul"),
    ]
    if add is not None:
        arrays["c"] = rng.standard_normal(add).astype(dtype)
        nodes.append(helper.make_node("Add", ["c", "m"] if constant_first else ["m", "c"], ["Y"], name="add"))
    return make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [N, F])], arrays)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def fold_forward_matmul(original: onnx.ModelProto, dtype=np.float32):
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "forward_matmul")
    assert (record.producer, record.producer_node, record.output) == (
        "MatMul",
        "matmul",
        original.graph.node[2].output[0],
    )
    assert folded.graph.node[1].op_type == "MatMul" and folded.graph.node[1].input[0] == "r"
    assert_equivalent(original, folded, dtype)
    return folded, report


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_folds_bn_into_matmul_with_a_new_add(dtype):
    original = bn_matmul(dtype=dtype)
    folded, report = fold_forward_matmul(original, dtype)
    assert (report.nodes_before, report.nodes_after) == (3, 3)
    assert op_types(folded) == ["Relu", "MatMul", "Add"]
    add = folded.graph.node[2]
    assert add.input[0] == folded.graph.node[1].output[0] and add.output[0] == "Y"
    assert initializer(folded, add.input[1]).shape == (F,)
    assert initializer(folded, add.input[1]).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("add_shape", [(F,), (1, F), (), (1,)], ids=str)
def test_folds_bn_into_matmul_and_its_added_bias(dtype, add_shape):
    original = bn_matmul(dtype=dtype, add=add_shape)
    folded, report = fold_forward_matmul(original, dtype)
    assert "through Add 'add'" in report.records[0].detail
    assert (report.nodes_before, report.nodes_after) == (4, 3)
    assert op_types(folded) == ["Relu", "MatMul", "Add"]
    assert folded.graph.node[2].name == "add"  # the existing Add carries c + t·W
    assert initializer(folded, folded.graph.node[2].input[1]).shape == (F,)


def test_folds_bn_into_matmul_with_the_added_constant_first():
    folded, _ = fold_forward_matmul(bn_matmul(add=(F,), constant_first=True))
    assert op_types(folded) == ["Relu", "MatMul", "Add"]


def test_folds_bn_into_matmul_adding_a_new_add_before_a_per_row_constant():
    """``c`` of shape [N, F] is not per feature: it stays, and the shift gets an Add of its own."""
    original = bn_matmul(add=(N, F))
    folded, report = fold_forward_matmul(original)
    assert "through Add" not in report.records[0].detail
    assert op_types(folded) == ["Relu", "MatMul", "Add", "Add"]
    assert folded.graph.node[3].name == "add"


def test_folds_bn_into_matmul_whose_output_has_other_readers():
    original = bn_matmul(add=(F,))
    original.graph.node.append(helper.make_node("Sigmoid", ["m"], ["S"], name="sigmoid"))
    original.graph.output.append(io("S", np.float32, [N, F]))
    folded, _ = fold_forward_matmul(original)
    assert op_types(folded) == ["Relu", "MatMul", "Add", "Add", "Sigmoid"]


def test_folds_bn_into_matmul_whose_output_is_a_graph_output():
    original = bn_matmul()
    folded, _ = fold_forward_matmul(original)
    assert [output.name for output in folded.graph.output] == ["Y"]
    assert folded.graph.node[-1].output[0] == "Y"


def test_skips_when_matmul_input_is_not_2d():
    """BN on [N, C, L] normalises C; MatMul contracts L."""
    dtype = np.float32
    rng = np.random.default_rng(3)
    arrays = {"W": rng.standard_normal((6, F)).astype(dtype), **bn_arrays(K, dtype)}
    nodes = [bn_node("X", "bn_out"), helper.make_node("MatMul", ["bn_out", "W"], ["Y"], name="matmul")]
    original = make_model(nodes, [io("X", dtype, [N, K, 6])], [io("Y", dtype, [N, K, F])], arrays)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.CHANNEL_AXIS_NOT_WEIGHT_AXIS)
    assert (record.producer, record.rule) == ("MatMul", "forward_matmul")
    assert op_types(folded) == ["BatchNormalization", "MatMul"]


def test_skips_when_following_matmul_weight_not_constant():
    original = bn_matmul()
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "W"))
    original.graph.input.append(io("W", np.float32, [K, F]))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)
    assert op_types(folded) == ["Relu", "BatchNormalization", "MatMul"]


def test_skips_when_following_matmul_weight_is_3d():
    dtype = np.float32
    arrays = {"W": np.ones((2, K, F), dtype), **bn_arrays(K, dtype)}
    nodes = [bn_node("X", "bn_out"), helper.make_node("MatMul", ["bn_out", "W"], ["Y"], name="matmul")]
    original = make_model(nodes, [io("X", dtype, [N, K])], [io("Y", dtype, [2, N, F])], arrays)
    _, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.UNSUPPORTED_LAYOUT)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_torch_batchnorm1d_into_bias_free_linear(exporter):
    """TorchScript exports a bias-free Linear as MatMul, dynamo as Gemm without C."""
    torch = torch_or_skip()
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3, bias=False)
    )
    rule = "forward_matmul" if exporter == "torchscript" else "forward_gemm"
    folded = fold_torch(net, torch.randn(4, 6), exporter, [(rule, True)])
    if exporter == "torchscript":
        assert op_types(folded) == ["Gemm", "Relu", "MatMul", "Add"]
