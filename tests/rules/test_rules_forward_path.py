"""BatchNormalization → Identity / Dropout / pooling / Flatten / flattening Reshape → Gemm, MatMul (or Conv)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from forward_torch import EXPORTERS, fold_torch, torch_or_skip
from onnx import helper
from rules_helpers import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    OPSET,
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

N, C, H, W, F = 2, 4, 3, 3, 5
FLAT = C * H * W

Step = tuple[str, dict, dict]  # op type, attributes, extra constant inputs {name: array} (in input order)


def step(op_type: str, attributes: dict | None = None, **inputs: np.ndarray) -> Step:
    return (op_type, attributes or {}, inputs)


def bn_path(
    steps: list[Step],
    features: int,
    *,
    layer: str = "Gemm",
    dtype=np.float32,
    opset: int = OPSET,
    out_shape: list[int] | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """``X[N, C, H, W] → Relu → BN → steps… → layer``; the layer contracts ``features`` (Gemm: transB=1 with C)."""
    rng = np.random.default_rng(seed)
    arrays = dict(bn_arrays(C, dtype, seed=seed))
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"), bn_node("r", "bn_out")]
    previous = "bn_out"
    for index, (op_type, attributes, extra) in enumerate(steps):
        names = []
        for name, array in extra.items():
            arrays[f"{name}_{index}"] = array
            names.append(f"{name}_{index}" if array is not None else "")
        nodes.append(helper.make_node(op_type, [previous, *names], [f"p{index}"], name=f"step{index}", **attributes))
        previous = f"p{index}"
    if layer == "Gemm":
        arrays["B"] = (rng.standard_normal((F, features)) * 0.3).astype(dtype)
        arrays["Cb"] = rng.standard_normal(F).astype(dtype)
        nodes.append(helper.make_node("Gemm", [previous, "B", "Cb"], ["Y"], name="layer", transB=1))
    elif layer == "MatMul":
        arrays["B"] = (rng.standard_normal((features, F)) * 0.3).astype(dtype)
        nodes.append(helper.make_node("MatMul", [previous, "B"], ["Y"], name="layer"))
    else:  # a 1x1 Conv
        arrays["B"] = (rng.standard_normal((F, features, 1, 1)) * 0.3).astype(dtype)
        nodes.append(helper.make_node("Conv", [previous, "B"], ["Y"], name="layer"))
    arrays = {name: array for name, array in arrays.items() if array is not None}
    output = io("Y", dtype, out_shape or [N, F])
    return make_model(nodes, [io("X", dtype, [N, C, H, W])], [output], arrays, opset=opset)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def assert_folds_across(original: onnx.ModelProto, rule: str = "forward_gemm", dtype=np.float32) -> onnx.ModelProto:
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_folded(record, rule)
    assert (record.producer_node, record.output) == ("layer", "Y")
    steps = [node for node in original.graph.node if node.name.startswith("step")]
    assert "across " + ", ".join(f"{node.op_type} {node.name!r}" for node in steps) in record.detail
    assert "BatchNormalization" not in op_types(folded)
    assert report.nodes_after == report.nodes_before - 1 + (rule == "forward_matmul")  # MatMul gains an Add
    first = next(node for node in folded.graph.node if node.name in ("step0", "layer"))
    assert first.input[0] == "r"  # the first path node reads BN's input
    assert_equivalent(original, folded, dtype)
    return folded


def assert_skipped_across(original: onnx.ModelProto, reason: SkipReason, producer: str | None = None) -> None:
    folded, report = fold_proto(original)
    record = only_record(report)
    assert_skipped(record, reason)
    if producer is not None:
        assert record.producer == producer
    assert op_types(folded) == op_types(original)


# -- positive ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_folds_across_flatten(dtype):
    assert_folds_across(bn_path([step("Flatten", {"axis": 1})], FLAT, dtype=dtype), dtype=dtype)


def test_folds_across_flatten_with_negative_axis():
    assert_folds_across(bn_path([step("Flatten", {"axis": -3})], FLAT))


def test_folds_across_flatten_into_matmul():
    folded = assert_folds_across(bn_path([step("Flatten")], FLAT, layer="MatMul"), rule="forward_matmul")
    assert op_types(folded) == ["Relu", "Flatten", "MatMul", "Add"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    ("target", "allowzero"),
    [((0, -1), 0), ((N, -1), 0), ((-1, FLAT), 0), ((N, FLAT), 0), ((0, FLAT), 0), ((N, FLAT), 1)],
    ids=["0,-1", "N,-1", "-1,K", "N,K", "0,K", "N,K_allowzero"],
)
def test_folds_across_reshape_that_flattens(target, allowzero, dtype):
    steps = [step("Reshape", {"allowzero": allowzero}, shape=ints(*target))]
    assert_folds_across(bn_path(steps, FLAT, dtype=dtype), dtype=dtype)


def test_folds_across_identity_and_dropout():
    steps = [step("Identity"), step("Dropout"), step("Flatten")]
    assert_folds_across(bn_path(steps, FLAT))


def test_folds_across_dropout_in_inference_mode_with_ratio():
    dropout = step("Dropout", ratio=np.array(0.4, np.float32), training_mode=np.array(False))
    assert_folds_across(bn_path([dropout, step("Flatten")], FLAT))


def test_folds_across_dropout_whose_mask_is_unread():
    original = bn_path([step("Dropout"), step("Flatten")], FLAT)
    original.graph.node[2].output.append("mask")
    assert_folds_across(original)


def test_folds_across_opset_10_dropout():
    assert_folds_across(bn_path([step("Dropout", {"ratio": 0.3}), step("Flatten")], FLAT, opset=10))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_folds_across_global_average_pool(dtype):
    assert_folds_across(bn_path([step("GlobalAveragePool"), step("Flatten")], C, dtype=dtype), dtype=dtype)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [(2, 3), (-2, -1)], ids=["axes", "negative_axes"])
@pytest.mark.parametrize("opset", [17, 18])
def test_folds_across_reduce_mean_over_spatial_axes(keepdims, axes, opset):
    if opset < 18:
        reduce = step("ReduceMean", {"axes": list(axes), "keepdims": keepdims})
    else:
        reduce = step("ReduceMean", {"keepdims": keepdims}, axes=ints(*axes))
    steps = [reduce] if keepdims == 0 else [reduce, step("Flatten")]
    assert_folds_across(bn_path(steps, C, opset=opset))


def test_folds_across_reduce_mean_over_one_spatial_axis():
    """Averaging over W only keeps [N, C, H]; the flatten then gives each channel a block of H features."""
    steps = [step("ReduceMean", {"axes": [3], "keepdims": 0}), step("Flatten")]
    assert_folds_across(bn_path(steps, C * H))


def test_folds_across_global_average_pool_into_conv():
    folded = assert_folds_across(
        bn_path([step("GlobalAveragePool")], C, layer="Conv", out_shape=[N, F, 1, 1]), "forward_conv"
    )
    assert op_types(folded) == ["Relu", "GlobalAveragePool", "Conv"]


def test_folds_face_recognition_head_forward_and_backward():
    """BN2d → Dropout → Flatten → Gemm → BN1d: the first folds forward, the second backward, into one Gemm."""
    original = bn_path([step("Dropout"), step("Flatten")], FLAT)
    original.graph.node[-1].output[0] = "g"
    original.graph.node.append(bn_node("g", "Y", prefix="bn1"))
    original.graph.initializer.extend(
        helper.make_tensor(name, 1, a.shape, a.tolist()) for name, a in bn_arrays(F, np.float32, "bn1", 4).items()
    )
    folded, report = fold_proto(original)
    assert [(r.node, r.rule, r.folded) for r in report.records] == [("bn", "forward_gemm", True), ("bn1", "gemm", True)]
    assert op_types(folded) == ["Relu", "Dropout", "Flatten", "Gemm"]
    assert_equivalent(original, folded)


def batch_size_target(
    model: onnx.ModelProto, read: str, index: int = 0, reshape_name: str = "step0", symbolic: bool = True
) -> None:
    """Make the Reshape read its target as ``Concat(Unsqueeze(Gather(Shape(read), index)), [-1])``; with
    ``symbolic``, the batch dimension is named ``N``."""
    if symbolic:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    reshape = next(node for node in model.graph.node if node.name == reshape_name)
    position = list(model.graph.node).index(reshape)
    model.graph.initializer.extend([helper.make_tensor("index", onnx.TensorProto.INT64, [], [index])])
    model.graph.initializer.extend([helper.make_tensor("zero_axis", onnx.TensorProto.INT64, [1], [0])])
    model.graph.initializer.extend([helper.make_tensor("rest", onnx.TensorProto.INT64, [1], [-1])])
    nodes = [
        helper.make_node("Shape", [read], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "index"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["batch_1d", "rest"], ["target"], name="concat", axis=0),
    ]
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    reshape.input[1] = "target"
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("read", ["bn_out", "p0", "r"], ids=["bn_output", "path_value", "bn_input"])
def test_folds_across_reshape_to_the_runtime_batch_size(read):
    """TorchScript's ``x.view(x.size(0), -1)`` with a dynamic batch: Shape may read BN's output."""
    original = bn_path([step("Identity"), step("Reshape", shape=ints(0, -1))], FLAT)
    batch_size_target(original, read, reshape_name="step1")
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "forward_gemm")
    assert "BatchNormalization" not in op_types(folded)
    assert_equivalent(original, folded)


# -- negative ------------------------------------------------------------------------------------------------


def test_skips_when_forward_path_branches():
    original = bn_path([step("Flatten")], FLAT)
    original.graph.node.append(helper.make_node("Sigmoid", ["p0"], ["S"], name="sigmoid"))
    original.graph.output.append(io("S", np.float32, [N, FLAT]))
    assert_skipped_across(original, SkipReason.FORWARD_PATH_BRANCHES, producer="Flatten")
    assert_equivalent(original, fold_proto(original)[0])


def test_skips_when_forward_path_is_graph_output():
    original = bn_path([step("Identity"), step("Flatten")], FLAT)
    original.graph.output.append(io("p1", np.float32, [N, FLAT]))
    assert_skipped_across(original, SkipReason.FORWARD_PATH_IS_GRAPH_OUTPUT, producer="Flatten")


def test_skips_when_branching_path_leads_nowhere():
    """Flatten → {Sigmoid, Tanh}: no reader could fold, so the backward reason (Relu) stands."""
    original = bn_path([step("Flatten")], FLAT)
    original.graph.node[-1].input[0] = "t"
    original.graph.node.insert(3, helper.make_node("Tanh", ["p0"], ["t"], name="tanh"))
    original.graph.node.append(helper.make_node("Sigmoid", ["p0"], ["S"], name="sigmoid"))
    original.graph.output.append(io("S", np.float32, [N, FLAT]))
    assert_skipped_across(original, SkipReason.UNSUPPORTED_PRODUCER, producer="Relu")


@pytest.mark.parametrize(
    ("target", "features", "layer", "out_shape"),
    [((2 * N, FLAT // 2), FLAT // 2, "Gemm", [2 * N, F]), ((0, C, -1), H * W, "MatMul", [N, C, F])],
    ids=["rows_mix_channels", "rank_3"],
)
def test_skips_when_reshape_mixes_channels(target, features, layer, out_shape):
    steps = [step("Reshape", shape=ints(*target))]
    original = bn_path(steps, features, layer=layer, out_shape=out_shape)
    assert_skipped_across(original, SkipReason.RESHAPE_NOT_FLATTEN, producer=layer)
    assert_equivalent(original, fold_proto(original)[0])


@pytest.mark.parametrize(
    "pool",
    [step("GlobalMaxPool"), step("MaxPool", {"kernel_shape": [3, 3]}), step("AveragePool", {"kernel_shape": [3, 3]})],
    ids=["global_max", "max", "average"],
)
def test_skips_when_pooling_is_not_global_average(pool):
    original = bn_path([pool, step("Flatten")], C)
    assert_skipped_across(original, SkipReason.UNSUPPORTED_PRODUCER, producer="Relu")
    assert "no rule folds into Relu" in only_record(fold_proto(original)[1]).detail


@pytest.mark.parametrize(
    ("axis", "features", "out_shape"), [(2, H * W, [N * C, F]), (0, N * FLAT, [1, F])], ids=["axis2", "axis0"]
)
def test_skips_when_flatten_axis_not_channel(axis, features, out_shape):
    original = bn_path([step("Flatten", {"axis": axis})], features, out_shape=out_shape)
    assert_skipped_across(original, SkipReason.FLATTEN_AXIS_NOT_CHANNEL, producer="Gemm")


@pytest.mark.parametrize(
    "dropout",
    [
        step("Dropout", ratio=np.array(0.5, np.float32), training_mode=np.array(True)),
        step("Dropout", ratio=None, training_mode=np.array(True)),
    ],
    ids=["with_ratio", "without_ratio"],
)
def test_skips_when_dropout_in_training_mode(dropout):
    original = bn_path([dropout, step("Flatten")], FLAT)
    assert_skipped_across(original, SkipReason.DROPOUT_NOT_INFERENCE, producer="Gemm")


def test_skips_when_dropout_training_mode_is_a_runtime_input():
    original = bn_path([step("Dropout"), step("Flatten")], FLAT)
    original.graph.node[2].input.extend(["", "train"])
    original.graph.input.append(helper.make_tensor_value_info("train", onnx.TensorProto.BOOL, []))
    assert_skipped_across(original, SkipReason.DROPOUT_NOT_INFERENCE)


def test_skips_when_dropout_mask_is_read():
    original = bn_path([step("Dropout"), step("Flatten")], FLAT)
    original.graph.node[2].output.append("mask")
    original.graph.output.append(helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [N, C, H, W]))
    assert_skipped_across(original, SkipReason.DROPOUT_NOT_INFERENCE)
    assert_equivalent(original, fold_proto(original)[0])


def test_skips_when_runtime_reshape_target_reads_another_dimension():
    """Target ``[C, -1]`` (index 1 of the shape): the Gemm reads ``[C, N·H·W]``, rows mixing batch and channels."""
    original = bn_path([step("Reshape", shape=ints(C, -1))], N * H * W, out_shape=[C, F])
    batch_size_target(original, "bn_out", index=1, symbolic=False)  # (the same target, computed at run time)
    assert_skipped_across(original, SkipReason.RESHAPE_NOT_FLATTEN, producer="Gemm")


def test_skips_when_reduce_mean_averages_channels():
    steps = [step("ReduceMean", {"axes": [1], "keepdims": 0}), step("Flatten")]
    original = bn_path(steps, H * W)
    assert_skipped_across(original, SkipReason.REDUCE_AXES_NOT_SPATIAL, producer="Gemm")


# -- real exports --------------------------------------------------------------------------------------------


def conv_head(torch, between):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), *between, torch.nn.Linear(4 * 6 * 6, 5)
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_torch_conv_relu_batchnorm2d_flatten_linear(exporter):
    torch = torch_or_skip()
    net = conv_head(torch, [torch.nn.Flatten()])
    fold_torch(net, torch.randn(2, 3, 8, 8), exporter, [("forward_gemm", True)])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_torch_view_with_a_dynamic_batch(exporter):
    """``y.view(y.size(0), -1)`` exported with a named batch dimension (TorchScript: Shape → Gather → Concat)."""
    torch = torch_or_skip()

    class View(torch.nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    net = conv_head(torch, [View()])
    fold_torch(net, torch.randn(2, 3, 8, 8), exporter, [("forward_gemm", True)], dynamic_batch=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_folds_torch_face_head(exporter):
    """Conv → ReLU → BN2d → Dropout → Flatten → Linear → BN1d: both BNs fold into the Linear."""
    torch = torch_or_skip()
    net = torch.nn.Sequential(*conv_head(torch, [torch.nn.Dropout(0.4), torch.nn.Flatten()]), torch.nn.BatchNorm1d(5))
    folded = fold_torch(net, torch.randn(2, 3, 8, 8), exporter, [("forward_gemm", True), ("gemm", True)])
    assert op_types(folded).count("Gemm") == 1


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("pooling", ["adaptive_avg_pool", "mean"])
def test_folds_torch_convmixer_head(exporter, pooling):
    """Conv → GELU → BN2d → global average (AdaptiveAvgPool2d + Flatten, or mean over H, W) → Linear."""
    torch = torch_or_skip()

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    pool = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()] if pooling != "mean" else [Mean()]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.BatchNorm2d(4), *pool, torch.nn.Linear(4, 5)
    )
    fold_torch(net, torch.randn(2, 3, 8, 8), exporter, [("forward_gemm", True)])
