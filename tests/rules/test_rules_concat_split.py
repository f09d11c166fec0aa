"""``Concat(axis=1) → BN`` split into the layers of the Concat's inputs (mixnet's mixed kernels)."""

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

CONV_DTYPES, CONV_DTYPE_IDS = FLOAT_DTYPES[:3], DTYPE_IDS[:3]  # (no bf16 Conv at opset 17)
IN_CHANNELS, SIZE = 4, 7


def mixed_conv(
    kernels=(3, 5),
    *,
    channels=(3, 5),
    dtype=np.float32,
    bias: bool = True,
    group: int = 1,
    axis: int = 1,
    add_after: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """``X → Conv_i (kernel k_i, 'same' padding, c_i channels) → Concat(axis) → BN`` (mixnet's MixedConv)."""
    rng = np.random.default_rng(seed)
    joined = axis in (1, -3)  # else the test's axis 2: equal channel counts, stacked heights
    total = sum(channels) if joined else channels[0]
    arrays = bn_arrays(total, dtype, seed=seed)
    nodes, parts = [], []
    for index, (kernel, count) in enumerate(zip(kernels, channels, strict=True)):
        arrays[f"W{index}"] = rng.standard_normal((count, IN_CHANNELS // group, kernel, kernel)).astype(dtype)
        inputs = ["X", f"W{index}"]
        if bias:
            arrays[f"b{index}"] = rng.standard_normal(count).astype(dtype)
            inputs.append(f"b{index}")
        pads = [kernel // 2] * 4
        nodes.append(helper.make_node("Conv", inputs, [f"c{index}"], name=f"conv{index}", pads=pads, group=group))
        parts.append(f"c{index}")
        if add_after == index:
            arrays["added"] = rng.standard_normal((count, 1, 1)).astype(dtype)
            nodes.append(helper.make_node("Add", [f"c{index}", "added"], ["a"], name="add"))
            parts[-1] = "a"
    nodes.append(helper.make_node("Concat", parts, ["cat"], name="concat", axis=axis))
    nodes.append(bn_node("cat", "Y"))
    shape = [2, total, SIZE, SIZE] if joined else [2, total, SIZE * len(kernels), SIZE]
    return make_model(nodes, [io("X", dtype, [2, IN_CHANNELS, SIZE, SIZE])], [io("Y", dtype, shape)], arrays)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=CONV_DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    ("kernels", "channels"), [((3, 5), (3, 5)), ((3, 5, 7), (2, 2, 4))], ids=["two_convs", "three_convs"]
)
def test_folds_concat_of_convs_with_different_kernels(dtype, bias, kernels, channels):
    original = mixed_conv(kernels, channels=channels, dtype=dtype, bias=bias)
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, "concat_split")
    assert record.producer == "Concat"
    assert record.detail.endswith("split into " + ", ".join(f"Conv 'conv{i}'" for i in range(len(kernels))))
    assert op_types(folded) == ["Conv"] * len(kernels) + ["Concat"]
    assert folded.graph.node[-1].output[0] == "Y"  # the Concat carries the BN's output name
    assert (report.nodes_before, report.nodes_after) == (len(kernels) + 2, len(kernels) + 1)
    assert all(len(node.input) == 3 for node in folded.graph.node[:-1])  # a bias was created where absent
    assert_equivalent(original, folded, dtype)


def test_folds_concat_of_depthwise_convs():
    original = mixed_conv((3, 5), channels=(4, 4), group=IN_CHANNELS)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    assert_equivalent(original, folded, np.float32)


def test_folds_concat_with_a_negative_axis():
    original = mixed_conv(axis=-3)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    assert_equivalent(original, folded, np.float32)


def test_folds_concat_of_conv_and_conv_with_added_constant():
    original = mixed_conv(add_after=1)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    assert op_types(folded) == ["Conv", "Conv", "Concat"]  # the Add moved into the second Conv's bias
    assert_equivalent(original, folded, np.float32)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_mixed_kernel_block_exported_by_torch(exporter):
    torch = torch_or_skip()

    class MixedConv(torch.nn.Module):  # timm's MixedConv2d followed by its BN
        def __init__(self) -> None:
            super().__init__()
            self.convs = torch.nn.ModuleList(
                torch.nn.Conv2d(2, 3, k, padding=k // 2, groups=1, bias=False) for k in (3, 5, 7)
            )
            self.bn = torch.nn.BatchNorm2d(9)

        def forward(self, x):
            parts = torch.split(x, 2, dim=1)
            return self.bn(torch.cat([conv(part) for conv, part in zip(self.convs, parts, strict=True)], 1))

    folded = fold_torch(MixedConv(), torch.randn(2, 6, 8, 8), exporter, [("concat_split", True)])
    assert op_types(folded).count("Conv") == 3


def dense_concat(op: str, *, dtype=np.float32, bias: bool = False, counts=(3, 2)) -> onnx.ModelProto:
    """``X[N, K] → (Gemm | MatMul [→ Add(b)])_i → Concat(axis=1) → BN``."""
    rng = np.random.default_rng(0)
    arrays = bn_arrays(sum(counts), dtype)
    nodes, parts = [], []
    for index, count in enumerate(counts):
        arrays[f"W{index}"] = rng.standard_normal((5, count)).astype(dtype)
        if bias:
            arrays[f"b{index}"] = rng.standard_normal(count).astype(dtype)
        if op == "Gemm":
            inputs = ["X", f"W{index}", f"b{index}"] if bias else ["X", f"W{index}"]
            nodes.append(helper.make_node("Gemm", inputs, [f"y{index}"], name=f"gemm{index}"))
        else:
            nodes.append(helper.make_node("MatMul", ["X", f"W{index}"], [f"y{index}"], name=f"matmul{index}"))
            if bias:
                nodes.append(helper.make_node("Add", [f"y{index}", f"b{index}"], [f"z{index}"], name=f"add{index}"))
        parts.append(f"z{index}" if bias and op == "MatMul" else f"y{index}")
    nodes += [helper.make_node("Concat", parts, ["cat"], name="concat", axis=1), bn_node("cat", "Y")]
    return make_model(nodes, [io("X", dtype, [3, 5])], [io("Y", dtype, [3, sum(counts)])], arrays)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_folds_concat_of_dense_layers(op, bias, dtype):
    original = dense_concat(op, dtype=dtype, bias=bias)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    if op == "Gemm":
        assert op_types(folded) == ["Gemm", "Gemm", "Concat"]
    else:  # MatMul keeps its shift in an Add: the existing one, or a new one between the MatMul and the Concat
        assert op_types(folded) == ["MatMul", "Add", "MatMul", "Add", "Concat"]
    assert_equivalent(original, folded, dtype)


# -- negative cases: the BN stays, the whole graph untouched -------------------------------------------------


def test_skips_when_concat_input_is_read_by_another_node():
    original = mixed_conv()
    original.graph.node.insert(2, helper.make_node("Relu", ["c1"], ["side"], name="relu"))
    original.graph.output.append(io("side", np.float32, [2, 5, SIZE, SIZE]))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.PRODUCER_OUTPUT_SHARED)
    assert record.detail.startswith("Concat input 1 ('c1')")
    assert_same_graph(original, folded)


def test_skips_when_concat_input_is_a_graph_output():
    original = mixed_conv()
    original.graph.output.append(io("c0", np.float32, [2, 3, SIZE, SIZE]))
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)
    assert_same_graph(original, folded)


def test_skips_when_the_same_value_feeds_the_concat_twice():
    original = mixed_conv()
    concat = original.graph.node[2]
    concat.input[1] = "c0"
    del original.graph.node[1]
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "W1"))
    original.graph.initializer.remove(next(i for i in original.graph.initializer if i.name == "b1"))
    original = make_model(
        list(original.graph.node),
        list(original.graph.input),
        [io("Y", np.float32, [2, 6, SIZE, SIZE])],
        {**initializers(original), **bn_arrays(6, np.float32)},
    )
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.CONCAT_INPUT_REPEATED)
    assert_same_graph(original, folded)


def test_skips_when_a_concat_input_has_no_rule():
    original = mixed_conv()
    original.graph.node.insert(2, helper.make_node("Relu", ["c1"], ["r1"], name="relu"))
    original.graph.node[3].input[1] = "r1"
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.UNSUPPORTED_PRODUCER)
    assert "Concat input 1" in record.detail and "Relu" in record.detail
    assert_same_graph(original, folded)


def test_skips_when_concat_axis_is_not_the_channel_axis():
    original = mixed_conv((3, 3), channels=(4, 4), axis=2)
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.CONCAT_AXIS_NOT_CHANNEL)
    assert_same_graph(original, folded)


def test_skips_when_one_part_overflows_its_dtype():
    original = mixed_conv(dtype=np.float16)
    weight = next(i for i in original.graph.initializer if i.name == "W1")
    weight.CopyFrom(numpy_helper.from_array(np.full((5, IN_CHANNELS, 5, 5), 60000, np.float16), "W1"))
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, SkipReason.FOLDED_WEIGHTS_OVERFLOW)
    assert record.detail.startswith("Concat input 1")
    assert_same_graph(original, folded)  # the first Conv, which could fold, is untouched too


@pytest.mark.parametrize(("skip", "reason"), [("concat_split", "concat_split"), ("conv", "conv")])
def test_skips_when_rule_disabled(skip, reason):
    original = mixed_conv()
    folded, report = fold_proto(original, skip=[skip])
    record = only_record(report)
    assert_skipped(record, SkipReason.RULE_DISABLED)
    assert f"rule {reason!r} is disabled" in record.detail
    assert_same_graph(original, folded)


def test_folds_concat_of_grouped_conv_transposes():
    rng = np.random.default_rng(0)
    arrays = {
        "W0": rng.standard_normal((IN_CHANNELS, 1, 3, 3)).astype(np.float32),  # group 2: 2·1 channels
        "W1": rng.standard_normal((IN_CHANNELS, 3, 2, 2)).astype(np.float32),  # group 1: 3 channels
        **bn_arrays(5, np.float32),
    }
    nodes = [
        helper.make_node("ConvTranspose", ["X", "W0"], ["t0"], name="up0", group=2, strides=[2, 2], pads=[1, 1, 0, 0]),
        helper.make_node("ConvTranspose", ["X", "W1"], ["t1"], name="up1", strides=[2, 2]),
        helper.make_node("Concat", ["t0", "t1"], ["cat"], name="concat", axis=1),
        bn_node("cat", "Y"),
    ]
    inputs = [io("X", np.float32, [2, IN_CHANNELS, 3, 3])]
    original = make_model(nodes, inputs, [io("Y", np.float32, [2, 5, 6, 6])], arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    assert op_types(folded) == ["ConvTranspose", "ConvTranspose", "Concat"]
    assert_equivalent(original, folded, np.float32)


def test_folds_concat_of_convs_seen_through_channel_keeping_reshapes():
    rng = np.random.default_rng(0)
    arrays = {**bn_arrays(5, np.float32), "target": np.array([0, -1, SIZE * SIZE], np.int64)}
    nodes, parts = [], []
    for index, count in enumerate((2, 3)):
        arrays[f"W{index}"] = rng.standard_normal((count, IN_CHANNELS, 1, 1)).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["X", f"W{index}"], [f"c{index}"], name=f"conv{index}"))
        nodes.append(helper.make_node("Reshape", [f"c{index}", "target"], [f"r{index}"], name=f"reshape{index}"))
        parts.append(f"r{index}")
    nodes += [helper.make_node("Concat", parts, ["cat"], name="concat", axis=1), bn_node("cat", "Y")]
    inputs = [io("X", np.float32, ["n", IN_CHANNELS, SIZE, SIZE])]
    original = make_model(nodes, inputs, [io("Y", np.float32, ["n", 5, SIZE * SIZE])], arrays)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "concat_split")
    assert op_types(folded) == ["Conv", "Reshape", "Conv", "Reshape", "Concat"]
    assert_equivalent(original, folded, np.float32)
