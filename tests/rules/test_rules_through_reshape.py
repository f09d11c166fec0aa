"""Backward folds through a channel-keeping Reshape/Flatten: LeViT's Linear+BN, ``Conv → Reshape → BN1d``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from forward_torch import EXPORTERS, export, fold_torch, randomise_batch_norms, torch_or_skip
from onnx import helper
from rules_helpers import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_equivalent,
    assert_folded,
    assert_same_graph,
    assert_skipped,
    bn_arrays,
    bn_node,
    fold_proto,
    initializers,
    io,
    make_model,
    only_record,
    op_types,
)

from bnfold.passes import SkipReason

B, N, K, C = 2, 5, 8, 6


def levit_block(
    *,
    dtype=np.float32,
    bias: bool = False,
    flatten: bool = True,
    target: list[int] | None = None,
    batch: int | str = B,
    add_shape: tuple[int, ...] = (C,),
    extra_output: str | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """``X[B, N, K] @ W[K, C] (+ b) → Flatten(axis=2) | Reshape(target) → BN → Reshape [B, N, C]`` (LeViT)."""
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((K, C)).astype(dtype), **bn_arrays(C, dtype, seed=seed)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul")]
    linear = "m"
    if bias:
        arrays["b"] = rng.standard_normal(add_shape).astype(dtype)
        nodes.append(helper.make_node("Add", ["m", "b"], ["linear"], name="add"))
        linear = "linear"
    if flatten:
        nodes.append(helper.make_node("Flatten", [linear], ["flat"], name="flatten", axis=2))
    else:
        arrays["target"] = np.array(target if target is not None else [-1, C], np.int64)
        nodes.append(helper.make_node("Reshape", [linear, "target"], ["flat"], name="reshape"))
    nodes.append(bn_node("flat", "normed"))
    nodes.append(helper.make_node("Shape", [linear], ["shape"], name="shape"))
    nodes.append(helper.make_node("Reshape", ["normed", "shape"], ["Y"], name="back"))
    outputs = [io("Y", dtype, [batch, N, C])]
    if extra_output is not None:
        outputs.append(io(extra_output, dtype, [None] * (3 if extra_output == "m" else 2)))
    return make_model(nodes, [io("X", dtype, [batch, N, K])], outputs, arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_levit_linear_bn_exported_by_torch(exporter, bias, dtype):
    torch = torch_or_skip()

    class LinearBatchNorm(torch.nn.Module):  # timm's LeViT ``LinearNorm``
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(K, C, bias=bias)
            self.bn = torch.nn.BatchNorm1d(C)

        def forward(self, x):
            x = self.linear(x)
            return self.bn(x.flatten(0, 1)).reshape_as(x)

    example = torch.randn(B, N, K)
    if dtype == np.float32:  # compared with the export and with torch itself
        folded = fold_torch(LinearBatchNorm(), example, exporter, [("matmul", True)])
    else:
        net = LinearBatchNorm()
        randomise_batch_norms(net)
        original = export(net.half(), example.half(), exporter)
        folded, report = fold_proto(original)
        assert_folded(only_record(report), "matmul")
        assert_equivalent(original, folded, dtype, {original.graph.input[0].name: example.half().numpy()})
    assert "BatchNormalization" not in op_types(folded)
    matmul = op_types(folded).index("MatMul")
    assert op_types(folded)[matmul + 1] == "Add"  # the shift sits right after the MatMul (ORT fuses the pair)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "reshape"])
def test_folds_levit_block(dtype, bias, flatten):
    original = levit_block(dtype=dtype, bias=bias, flatten=flatten)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "matmul")
    assert f"through {'Flatten' if flatten else 'Reshape'}" in record.detail
    reshape = "Flatten" if flatten else "Reshape"
    assert op_types(folded) == ["MatMul", "Add", reshape, "Shape", "Reshape"]
    assert (report.nodes_before, report.nodes_after) == (6 if bias else 5, 5)
    matmul, add = folded.graph.node[:2]
    assert add.input[0] == matmul.output[0] and initializers(folded)[add.input[1]].shape == (C,)
    assert add.output[0] == ("linear" if bias else "m")  # the Add carries the name the reshape and Shape read
    assert folded.graph.node[2].output[0] == "normed"  # the reshape carries the BN's output name
    assert_equivalent(original, folded, dtype)


@pytest.mark.parametrize("target", [[-1, C], [B * N, C]], ids=str)
def test_folds_levit_block_with_a_symbolic_batch(target):
    # Nothing follows the channel on either side of [batch, N, C] → [·, C]: the ranks alone prove the fold.
    original = levit_block(flatten=False, target=target, batch="batch", bias=True)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "matmul")
    assert_equivalent(original, folded, np.float32)


def conv_reshape_bn(
    *, dtype=np.float32, spatial=(3, 4), target=None, op="Reshape", axis=1, batch: int | str = 2, seed=0
) -> onnx.ModelProto:
    """``X[n, 3, H, W] → Conv 1×1 (4 channels) → Reshape(target) | Flatten(axis) → BN``."""
    rng = np.random.default_rng(seed)
    channels = 4
    arrays = {
        "W": rng.standard_normal((channels, 3, 1, 1)).astype(dtype),
        "bias": rng.standard_normal(channels).astype(dtype),
        **bn_arrays(channels, dtype, seed=seed),
    }
    nodes = [helper.make_node("Conv", ["X", "W", "bias"], ["c"], name="conv")]
    if op == "Reshape":
        arrays["target"] = np.array(target, np.int64)
        nodes.append(helper.make_node("Reshape", ["c", "target"], ["r"], name="reshape"))
    else:
        nodes.append(helper.make_node("Flatten", ["c"], ["r"], name="flatten", axis=axis))
    nodes.append(bn_node("r", "Y"))
    inputs = [io("X", dtype, [batch, 3, *spatial])]
    return make_model(nodes, inputs, [io("Y", dtype, [None] * (len(target) if op == "Reshape" else 2))], arrays)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:3], ids=DTYPE_IDS[:3])  # (no bf16 Conv at opset 17)
@pytest.mark.parametrize(
    ("target", "batch"),
    [([2, 4, 12], 2), ([0, 4, -1], "n"), ([0, 4, 12], "n"), ([2, 4, 3, 4, 1], 2), ([-1, 4, 12], "n")],
    ids=["static", "copied_batch", "copied_batch_static_rest", "split_spatial", "inferred_batch"],
)
def test_folds_conv_through_reshape_keeping_the_channel_axis(dtype, target, batch):
    original = conv_reshape_bn(dtype=dtype, target=target, batch=batch)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "conv")
    assert "through Reshape 'reshape'" in record.detail
    assert op_types(folded) == ["Conv", "Reshape"]
    assert folded.graph.node[1].output[0] == "Y"
    assert_equivalent(original, folded, dtype)


def test_folds_conv_through_flatten_of_a_one_pixel_map():
    original = conv_reshape_bn(spatial=(1, 1), op="Flatten", axis=1)  # [2, 4, 1, 1] → [2, 4] → BatchNorm1d
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert op_types(folded) == ["Conv", "Flatten"]
    assert_equivalent(original, folded, np.float32)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_conv_flattened_into_batchnorm1d_exported_by_torch(exporter):
    torch = torch_or_skip()

    class ConvTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.conv(x).flatten(2))

    fold_torch(ConvTokens(), torch.randn(2, 3, 6, 6), exporter, [("conv", True)])


def test_folds_gemm_reshaped_to_a_one_pixel_map():
    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((K, C)).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "target": np.array([-1, C, 1, 1], np.int64),
        **bn_arrays(C, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["X", "W", "b"], ["g"], name="gemm"),
        helper.make_node("Reshape", ["g", "target"], ["r"], name="reshape"),
        bn_node("r", "Y"),
    ]
    original = make_model(nodes, [io("X", np.float32, [3, K])], [io("Y", np.float32, [3, C, 1, 1])], arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "gemm")
    assert op_types(folded) == ["Gemm", "Reshape"]
    assert_equivalent(original, folded, np.float32)


def runtime_target_reshape(record_output_shape: bool) -> onnx.ModelProto:
    """``Conv [2, 4, 3, 4] → Reshape(target fed at run time) → BN``; the output shape recorded or not."""
    original = conv_reshape_bn(target=[2, 4, 12])
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "target"))
    original.graph.input.append(io("target", np.int64, [3]))
    if record_output_shape:
        original.graph.value_info.append(io("r", np.float32, [2, 4, 12]))
    return original


def test_folds_when_a_runtime_reshape_target_has_a_recorded_output_shape():
    original = runtime_target_reshape(record_output_shape=True)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert_equivalent(
        original, folded, np.float32, {"X": np.ones((2, 3, 3, 4), np.float32), "target": np.array([2, 4, 12])}
    )


# -- negative cases ------------------------------------------------------------------------------------------


def test_skips_when_reshape_mixes_channels():
    # [2, 4, 4, 1] → [8, 4, 1]: BN's channel is the height of the Conv output, not its channel.
    original = conv_reshape_bn(spatial=(4, 1), target=[8, 4, 1])
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.RESHAPE_MIXES_CHANNEL)
    assert record.producer == "Conv"
    assert_same_graph(original, folded)
    assert_equivalent(original, folded, np.float32)


def test_skips_when_flatten_merges_the_channel_with_the_pixels():
    original = conv_reshape_bn(spatial=(2, 2), op="Flatten", axis=2)  # [2, 4, 2, 2] → [8, 4]: BN(4) sees pixels
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.RESHAPE_MIXES_CHANNEL)
    assert_same_graph(original, folded)


def test_skips_when_the_reshape_cannot_be_proven_to_keep_the_channel():
    # [n, 3, h, w] → [0, 4, -1] keeps the channel, but [-1, 4, 12] with an unknown batch and unknown spatial
    # size can not be told apart from a reshape that mixes: nothing is known after the channel.
    original = conv_reshape_bn(target=[-1, 4, 12], batch="n", spatial=("h", "w"))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.RESHAPE_MIXES_CHANNEL)
    assert_same_graph(original, folded)


def test_skips_when_a_runtime_reshape_target_leaves_the_output_shape_unknown():
    original = runtime_target_reshape(record_output_shape=False)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.RESHAPE_MIXES_CHANNEL)
    assert_same_graph(original, folded)


def test_skips_when_reshape_output_is_a_graph_output():
    original = levit_block(extra_output="flat")
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)
    assert_same_graph(original, folded)


def test_skips_when_matmul_output_is_a_graph_output():
    original = levit_block(extra_output="m")
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)
    assert_same_graph(original, folded)


def test_skips_when_matmul_output_is_read_by_another_node():
    original = levit_block()
    relu = helper.make_node("Relu", ["m"], ["other"], name="relu")
    original.graph.node.insert(1, relu)
    original.graph.output.append(io("other", np.float32, [B, N, C]))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_SHARED)
    assert_same_graph(original, folded)


def test_skips_when_added_bias_varies_along_the_tokens():
    original = levit_block(bias=True, add_shape=(N, 1))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.ADDED_CONSTANT_NOT_PER_CHANNEL)
    assert_same_graph(original, folded)


def test_skips_when_the_reshape_reads_a_layer_without_rule():
    original = levit_block()
    original.graph.node[0].op_type = "Relu"
    del original.graph.node[0].input[1]
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "W"))
    original.graph.input[0].type.tensor_type.shape.dim[2].dim_value = C
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)
    assert record.producer == "Flatten"
    assert_same_graph(original, folded)


def test_skips_matmul_through_reshape_when_rule_disabled():
    original = levit_block()
    folded, report = fold_proto(original, skip=["matmul"])
    assert_skipped(only_record(report), SkipReason.RULE_DISABLED)
    assert_same_graph(original, folded)
