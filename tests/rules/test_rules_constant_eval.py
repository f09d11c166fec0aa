"""The bounded constant evaluator (``passes/constant_eval.py``) and the fold of parameters it evaluates.

Each evaluable op is checked on its own (positive and negative), then the pattern torch's raw dynamo export
leaves behind — ``Expand(CastLike(Constant 0, X), Expand(Shape(W, start=0, end=1), [1]))`` as a bias-less
Conv's bias — is folded end to end, and the computed chain pruned.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from rules_helpers import (
    assert_equivalent,
    assert_folded,
    assert_skipped,
    bn_arrays,
    bn_node,
    fold_proto,
    io,
    only_record,
    op_types,
    tensor,
)

from bnfold.passes import SkipReason
from bnfold.passes.constant_eval import MAX_RESULT_ELEMENTS, ElementBudget
from bnfold.passes.constants import MAX_DEPTH, ConstantResolver

INT64 = np.int64


def model_of(
    nodes: list[onnx.NodeProto],
    arrays: dict[str, np.ndarray] | None = None,
    inputs: list[onnx.ValueInfoProto] | None = None,
    *,
    opset: int = 17,
    output: str = "out",
) -> ir.Model:
    """An (unchecked: some cases are invalid on purpose) model whose graph output is ``output``."""
    initializers = [tensor(name, array) for name, array in (arrays or {}).items()]
    out = helper.make_empty_tensor_value_info(output)
    graph = helper.make_graph(nodes, "g", inputs or [], [out], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def evaluated(nodes, arrays=None, inputs=None, *, opset: int = 17, output: str = "out") -> np.ndarray | None:
    model = model_of(nodes, arrays, inputs, opset=opset, output=output)
    return ConstantResolver(model).array(model.graph.outputs[0])


def node(op_type: str, inputs: list[str], output: str = "out", **attributes) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], **attributes)


def assert_array(actual: np.ndarray | None, expected: np.ndarray) -> None:
    assert actual is not None
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    np.testing.assert_array_equal(actual, expected)


# -- Constant, Identity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"value": tensor("v", np.arange(3, dtype=np.float32))}, np.arange(3, dtype=np.float32)),
        ({"value_float": 2.5}, np.array(2.5, np.float32)),
        ({"value_floats": [1.0, 2.0]}, np.array([1.0, 2.0], np.float32)),
        ({"value_int": 7}, np.array(7, INT64)),
        ({"value_ints": [1, 2]}, np.array([1, 2], INT64)),
    ],
    ids=["value", "value_float", "value_floats", "value_int", "value_ints"],
)
def test_evaluates_constant(attributes, expected) -> None:
    assert_array(evaluated([node("Constant", [], **attributes)]), expected)


def test_constant_with_string_value_is_not_constant() -> None:
    assert evaluated([node("Constant", [], value_string="zero")]) is None


def test_evaluates_identity_of_initializer() -> None:
    array = np.arange(4, dtype=np.float32)
    assert_array(evaluated([node("Identity", ["c"])], {"c": array}), array)


def test_identity_of_runtime_input_is_not_constant() -> None:
    assert evaluated([node("Identity", ["x"])], inputs=[io("x", np.float32, [2])]) is None


# -- Shape -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [({}, [6, 4, 3, 3]), ({"start": 0, "end": 1}, [6]), ({"start": -2}, [3, 3]), ({"start": 1, "end": 99}, [4, 3, 3])],
    ids=["whole", "start0_end1", "negative_start", "clamped_end"],
)
def test_evaluates_shape_of_constant(attributes, expected) -> None:
    weight = np.zeros((6, 4, 3, 3), np.float32)
    assert_array(evaluated([node("Shape", ["w"], **attributes)], {"w": weight}), np.array(expected, INT64))


def test_evaluates_shape_of_runtime_input_with_static_selected_dims() -> None:
    x = io("x", np.float32, ["N", 3, 8, 8])
    assert_array(evaluated([node("Shape", ["x"], start=1)], inputs=[x]), np.array([3, 8, 8], INT64))


def test_shape_of_runtime_dependent_dim_is_not_constant() -> None:
    x = io("x", np.float32, ["N", 3, 8, 8])
    assert evaluated([node("Shape", ["x"], start=0, end=1)], inputs=[x]) is None
    assert evaluated([node("Shape", ["x"])], inputs=[x]) is None


def test_shape_of_input_without_recorded_shape_is_not_constant() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
    assert evaluated([node("Shape", ["x"])], inputs=[x]) is None


# -- Cast, CastLike ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "dtype"),
    [(onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.FLOAT16, np.float16), (onnx.TensorProto.INT32, np.int32)],
    ids=["float", "float16", "int32"],
)
def test_evaluates_cast(to, dtype) -> None:
    array = np.array([1, -2, 3], INT64)
    assert_array(evaluated([node("Cast", ["c"], to=to)], {"c": array}), array.astype(dtype))


def test_cast_to_string_is_not_constant() -> None:
    assert evaluated([node("Cast", ["c"], to=onnx.TensorProto.STRING)], {"c": np.array([1], INT64)}) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=["fp32", "fp16", "fp64"])
def test_evaluates_cast_like_of_runtime_input_type(dtype) -> None:
    nodes = [
        node("Constant", [], "zero", value=tensor("z", np.array(0.0, np.float32))),
        node("CastLike", ["zero", "x"]),
    ]
    result = evaluated(nodes, inputs=[io("x", dtype, ["N", 3])])
    assert_array(result, np.array(0.0, dtype))


def test_cast_like_of_runtime_data_is_not_constant() -> None:
    inputs = [io("x", np.float32, [2]), io("y", np.float16, [2])]
    assert evaluated([node("CastLike", ["x", "y"])], inputs=inputs) is None


# -- Reshape, Unsqueeze, Squeeze -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [([3, 4], (3, 4)), ([0, -1], (2, 6)), ([-1], (12,)), ([2, 0, 2, 1], (2, 3, 2, 1))],
    ids=["explicit", "zero_copies", "minus_one", "zero_in_four_d"],
)
def test_evaluates_reshape(shape, expected) -> None:
    data = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    result = evaluated([node("Reshape", ["d", "s"])], {"d": data, "s": np.array(shape, INT64)})
    assert_array(result, data.reshape(expected))


def test_evaluates_reshape_allowzero_empty() -> None:
    data = np.zeros((0, 3), np.float32)
    result = evaluated([node("Reshape", ["d", "s"], allowzero=1)], {"d": data, "s": np.array([3, 0], INT64)})
    assert_array(result, data.reshape(3, 0))


@pytest.mark.parametrize(
    ("shape", "attributes"),
    [([5, -1], {}), ([-1, -1], {}), ([0, -1], {"allowzero": 1}), ([0, 0, 0, 0], {}), ([-2, 6], {})],
    ids=["size_mismatch", "two_minus_ones", "allowzero_zero_and_minus_one", "zero_past_rank", "below_minus_one"],
)
def test_invalid_reshape_is_not_constant(shape, attributes) -> None:
    data = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert evaluated([node("Reshape", ["d", "s"], **attributes)], {"d": data, "s": np.array(shape, INT64)}) is None


def test_reshape_to_runtime_shape_is_not_constant() -> None:
    data = np.arange(6, dtype=np.float32)
    assert evaluated([node("Reshape", ["d", "s"])], {"d": data}, [io("s", INT64, [2])]) is None


def test_evaluates_unsqueeze_with_axes_attribute_opset11() -> None:
    data = np.arange(3, dtype=np.float32)
    result = evaluated([node("Unsqueeze", ["d"], axes=[0, -1])], {"d": data}, opset=11)
    assert_array(result, data.reshape(1, 3, 1))


def test_evaluates_unsqueeze_with_axes_input_opset13() -> None:
    data = np.arange(3, dtype=np.float32)
    result = evaluated([node("Unsqueeze", ["d", "a"])], {"d": data, "a": np.array([1], INT64)}, opset=13)
    assert_array(result, data.reshape(3, 1))


def test_unsqueeze_with_runtime_axes_is_not_constant() -> None:
    data = np.arange(3, dtype=np.float32)
    assert evaluated([node("Unsqueeze", ["d", "a"])], {"d": data}, [io("a", INT64, [1])], opset=13) is None


def test_evaluates_squeeze_axes_attribute_input_and_none() -> None:
    data = np.arange(3, dtype=np.float32).reshape(1, 3, 1)
    assert_array(evaluated([node("Squeeze", ["d"], axes=[0])], {"d": data}, opset=11), data.reshape(3, 1))
    with_input = evaluated([node("Squeeze", ["d", "a"])], {"d": data, "a": np.array([-1], INT64)}, opset=13)
    assert_array(with_input, data.reshape(1, 3))
    assert_array(evaluated([node("Squeeze", ["d"])], {"d": data}, opset=13), data.reshape(3))


def test_squeeze_of_a_dimension_not_one_is_not_constant() -> None:
    data = np.zeros((1, 3), np.float32)
    assert evaluated([node("Squeeze", ["d"], axes=[1])], {"d": data}, opset=11) is None


# -- Concat, Expand, ConstantOfShape -------------------------------------------------------------------------------


def test_evaluates_concat() -> None:
    a, b = np.array([[1, 2]], INT64), np.array([[3, 4], [5, 6]], INT64)
    assert_array(evaluated([node("Concat", ["a", "b"], axis=0)], {"a": a, "b": b}), np.concatenate([a, b]))


def test_concat_with_runtime_or_mixed_inputs_is_not_constant() -> None:
    a = np.array([1, 2], INT64)
    assert evaluated([node("Concat", ["a", "x"], axis=0)], {"a": a}, [io("x", INT64, [2])]) is None
    mixed = {"a": a, "b": np.array([1.0], np.float32)}
    assert evaluated([node("Concat", ["a", "b"], axis=0)], mixed) is None


def test_evaluates_expand_bidirectionally() -> None:
    data = np.arange(3, dtype=np.float32).reshape(3, 1)
    result = evaluated([node("Expand", ["d", "s"])], {"d": data, "s": np.array([2, 1, 4], INT64)})
    assert_array(result, np.broadcast_to(data, (2, 3, 4)))
    assert result.flags.c_contiguous


def test_expand_to_incompatible_shape_is_not_constant() -> None:
    data = np.arange(3, dtype=np.float32)
    assert evaluated([node("Expand", ["d", "s"])], {"d": data, "s": np.array([4], INT64)}) is None


def test_expand_over_the_size_cap_is_not_constant() -> None:
    """A few bytes must not become gigabytes: 2**25 elements from a scalar stay not constant."""
    data = np.zeros((), np.float32)
    too_big = np.array([2 * MAX_RESULT_ELEMENTS], INT64)
    assert evaluated([node("Expand", ["d", "s"])], {"d": data, "s": too_big}) is None
    assert evaluated([node("ConstantOfShape", ["s"])], {"s": np.array([1 << 20, 1 << 20], INT64)}) is None


def test_evaluates_constant_of_shape() -> None:
    fill = tensor("f", np.array([1.5], np.float16))
    result = evaluated([node("ConstantOfShape", ["s"], value=fill)], {"s": np.array([2, 3], INT64)})
    assert_array(result, np.full((2, 3), 1.5, np.float16))
    assert_array(evaluated([node("ConstantOfShape", ["s"])], {"s": np.array([2], INT64)}), np.zeros(2, np.float32))


def test_constant_of_negative_shape_is_not_constant() -> None:
    assert evaluated([node("ConstantOfShape", ["s"])], {"s": np.array([-1], INT64)}) is None


# -- what is not evaluated -----------------------------------------------------------------------------------------


def test_unsupported_op_of_constants_is_not_constant() -> None:
    arrays = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    assert evaluated([node("Add", ["a", "b"])], arrays) is None


def test_chain_deeper_than_the_depth_cap_is_not_constant() -> None:
    def chain(length: int) -> list[onnx.NodeProto]:
        names = ["c", *(f"v{i}" for i in range(length - 1)), "out"]
        return [node("Identity", [names[i]], names[i + 1]) for i in range(length)]

    array = np.ones(2, np.float32)
    assert_array(evaluated(chain(MAX_DEPTH - 1), {"c": array}), array)
    assert evaluated(chain(MAX_DEPTH + 1), {"c": array}) is None


def test_results_are_memoised_and_read_only() -> None:
    model = model_of([node("Expand", ["d", "s"])], {"d": np.zeros((), np.float32), "s": np.array([3], INT64)})
    resolver = ConstantResolver(model)
    first = resolver.array(model.graph.outputs[0])
    assert resolver.array(model.graph.outputs[0]) is first
    assert not first.flags.writeable


def test_budget_refuses_past_the_total() -> None:
    budget = ElementBudget(per_result=10, total=15)
    assert budget.take(10)
    assert not budget.take(11)
    assert not budget.take(6)
    assert budget.take(5)


# -- the raw dynamo pattern, folded --------------------------------------------------------------------------------

C_IN, C_OUT = 3, 4


def dynamo_conv_bn(dtype, *, extra_reader: bool = False, convs: int = 1) -> onnx.ModelProto:
    """``convs`` × (bias-less Conv with raw dynamo's computed zero bias → BN), sharing one zero Constant."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    nodes = [node("Constant", [], "zero", value=tensor("z", np.array(0.0, np.float32)))]
    x = "X"
    for i in range(convs):
        arrays[f"W{i}"] = (rng.standard_normal((C_OUT if i == convs - 1 else C_IN, C_IN, 3, 3)) * 0.3).astype(dtype)
        channels = arrays[f"W{i}"].shape[0]
        arrays.update(bn_arrays(channels, dtype, prefix=f"bn{i}", seed=i))
        nodes += [
            node("Shape", [f"W{i}"], f"m{i}", start=0, end=1),
            node("Constant", [], f"one{i}", value_ints=[1]),
            node("Expand", [f"m{i}", f"one{i}"], f"shape{i}"),
            node("CastLike", ["zero", x], f"z{i}"),
            node("Expand", [f"z{i}", f"shape{i}"], f"bias{i}"),
            helper.make_node("Conv", [x, f"W{i}", f"bias{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            bn_node(f"conv{i}", f"Y{i}", prefix=f"bn{i}"),
        ]
        x = f"Y{i}"
    outputs = [io(x, dtype, ["N", C_OUT, 5, 5])]
    if extra_reader:
        outputs.append(io("bias0", dtype, [C_OUT]))
    graph = helper.make_graph(
        nodes, "g", [io("X", dtype, ["N", C_IN, 5, 5])], outputs, [tensor(k, v) for k, v in arrays.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_folds_conv_with_dynamo_computed_bias(dtype) -> None:
    original = dynamo_conv_bn(dtype)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert op_types(folded) == ["Conv"]  # the computed chain (Shape, Expand, CastLike, Constants) is pruned
    assert len(folded.graph.initializer) == 2  # the folded weight and the new bias
    assert_equivalent(original, folded, dtype)


def test_folds_chains_sharing_one_zero_constant_and_prunes_them_all() -> None:
    original = dynamo_conv_bn(np.float32, convs=3)
    folded, report = fold_proto(original)
    assert len(report.folded) == 3
    assert op_types(folded) == ["Conv"] * 3
    assert report.nodes_before == 22 and report.nodes_after == 3
    assert_equivalent(original, folded, np.float32)


def test_folds_and_keeps_chain_read_elsewhere() -> None:
    """The computed bias is also a graph output: the fold gives the Conv a new bias and keeps the chain."""
    original = dynamo_conv_bn(np.float32, extra_reader=True)
    folded, report = fold_proto(original)
    assert_folded(only_record(report), "conv")
    assert op_types(folded) == ["Constant", "Shape", "Constant", "Expand", "CastLike", "Expand", "Conv"]
    assert_equivalent(original, folded, np.float32)


def test_skips_when_bias_not_constant_for_a_runtime_shape() -> None:
    """A bias shaped from the runtime batch size (Shape(X, 0, 1), symbolic ``N``) is not a constant."""
    original = dynamo_conv_bn(np.float32)
    for graph_node in original.graph.node:
        if graph_node.op_type == "Shape":
            graph_node.input[0] = "X"
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.BIAS_NOT_CONSTANT)
    assert op_types(folded) == op_types(original)


def test_skips_when_bias_not_constant_for_an_unsupported_op() -> None:
    original = dynamo_conv_bn(np.float32)
    for graph_node in original.graph.node:
        if graph_node.output[0] == "bias0":
            graph_node.op_type = "Add"  # zero + shape-as-int would not type-check: keep it float
            graph_node.input[1] = "z0"
    folded, report = fold_proto(original)
    assert_skipped(only_record(report), SkipReason.BIAS_NOT_CONSTANT)
    assert op_types(folded) == op_types(original)
