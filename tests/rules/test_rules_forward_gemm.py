"""BatchNormalization → Gemm: the forward fold into the following Gemm (``Linear → ReLU → BatchNorm1d → Linear``)."""

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


def bn_gemm(
    *,
    dtype=np.float32,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    c_shape: tuple[int, ...] | None = (F,),
    trans_a: int = 0,
    seed: int = 0,
) -> onnx.ModelProto:
    """``X → Relu → BN → Gemm(B, C)``; ``c_shape`` None: no C."""
    rng = np.random.default_rng(seed)
    b_shape = (F, K) if trans_b else (K, F)
    channels = N if trans_a else K  # BN's axis 1: the Gemm's rows when A is transposed
    arrays = {"B": (rng.standard_normal(b_shape) * 0.5).astype(dtype), **bn_arrays(channels, dtype, seed=seed)}
    inputs = ["bn_out", "B"]
    if c_shape is not None:
        arrays["C"] = rng.standard_normal(c_shape).astype(dtype)
        inputs.append("C")
    attributes = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        bn_node("r", "bn_out"),
        helper.make_node("Gemm", inputs, ["Y"], name="gemm", **attributes),
    ]
    x_shape = [K, N] if trans_a else [N, K]
    return make_model(nodes, [io("X", dtype, x_shape)], [io("Y", dtype, [N, F])], arrays)


def gemm_attribute(model: onnx.ModelProto, name: str):
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    return next((helper.get_attribute_value(a) for a in gemm.attribute if a.name == name), None)


def assert_forward_gemm(original: onnx.ModelProto, dtype=np.float32) -> onnx.ModelProto:
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "forward_gemm")
    assert (record.producer, record.producer_node, record.output) == ("Gemm", "gemm", "Y")
    assert "folded consuming Gemm 'gemm'" in record.detail
    assert op_types(folded) == ["Relu", "Gemm"]
    assert report.nodes_after == report.nodes_before - 1
    gemm = folded.graph.node[-1]
    assert gemm.input[0] == "r" and len(gemm.input) == 3
    assert gemm_attribute(folded, "beta") == 1.0
    assert_equivalent(original, folded, dtype)
    return folded


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize("c_shape", [None, (F,), (1, F), (N, 1), (N, F), ()], ids=str)
def test_folds_bn_into_following_gemm(trans_b, c_shape):
    assert_forward_gemm(bn_gemm(trans_b=trans_b, c_shape=c_shape))


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 2.0), (-1.5, 0.25), (2.0, 0.0)], ids=str)
def test_folds_bn_into_gemm_with_alpha_and_beta(trans_b, alpha, beta):
    folded = assert_forward_gemm(bn_gemm(trans_b=trans_b, alpha=alpha, beta=beta))
    assert gemm_attribute(folded, "alpha") == pytest.approx(alpha)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c_shape", [None, (F,)], ids=["no_C", "C"])
def test_folds_bn_into_gemm_in_every_dtype(dtype, c_shape):
    folded = assert_forward_gemm(bn_gemm(dtype=dtype, trans_b=1, alpha=0.5, beta=2.0, c_shape=c_shape), dtype)
    c = next(i for i in folded.graph.initializer if i.name == folded.graph.node[-1].input[2])
    assert numpy_helper.to_array(c).dtype == np.dtype(dtype)


def test_folds_bn_into_gemm_whose_runtime_c_is_ignored_by_beta_zero():
    original = bn_gemm(beta=0.0, c_shape=None)
    original.graph.node[-1].input.append("C_runtime")
    original.graph.input.append(io("C_runtime", np.float32, [N, F]))
    assert_forward_gemm(original)


def test_skips_when_gemm_input_transposed():
    original = bn_gemm(trans_a=1)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.GEMM_INPUT_TRANSPOSED)
    assert (record.producer, record.rule) == ("Gemm", "forward_gemm")
    assert op_types(folded) == ["Relu", "BatchNormalization", "Gemm"]


def test_skips_when_following_gemm_weight_not_constant():
    original = bn_gemm()
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "B"))
    original.graph.input.append(io("B", np.float32, [K, F]))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.WEIGHT_NOT_CONSTANT)
    assert op_types(folded) == ["Relu", "BatchNormalization", "Gemm"]


def test_skips_when_following_gemm_bias_not_constant():
    original = bn_gemm(c_shape=None)
    original.graph.node[-1].input.append("C_runtime")
    original.graph.input.append(io("C_runtime", np.float32, [F]))
    _, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.BIAS_NOT_CONSTANT)


def test_skips_when_forward_gemm_rule_disabled():
    _, report = fold_proto(bn_gemm(), skip=["forward_gemm"])
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert "'forward_gemm'" in record.detail


def test_skips_when_bn_output_also_feeds_another_node():
    original = bn_gemm()
    original.graph.node.append(helper.make_node("Sigmoid", ["bn_out"], ["S"], name="sigmoid"))
    original.graph.output.append(io("S", np.float32, [N, K]))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)  # the backward reason (Relu) stands
    assert record.producer == "Relu"
    assert op_types(folded) == ["Relu", "BatchNormalization", "Gemm", "Sigmoid"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_torch_linear_relu_batchnorm1d_linear(exporter):
    torch = torch_or_skip()
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3), torch.nn.ReLU()
    )
    folded = fold_torch(net, torch.randn(4, 6), exporter, [("forward_gemm", True)])
    assert op_types(folded).count("Gemm") == 2
