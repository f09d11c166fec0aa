"""Input generation (dtypes, dynamic dims, shapes) and the .npz round trip."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper
from validate_builders import OPSET, conv_bn_chain, folded, single_op_model

from bnfold.errors import UsageError
from bnfold.validate import Verdict, generate_inputs, input_specs, load_inputs, save_inputs, verify
from bnfold.validate.inputs import LEADING_DIM_SIZES, OTHER_DIM_SIZES, InputSpec


def test_specs_skip_initializer_backed_inputs_and_keep_dims():
    model = conv_bn_chain(1, batch="batch", spatial=8)
    model.graph.input.append(helper.make_tensor_value_info("w0", onnx.TensorProto.FLOAT, [4, 3, 3, 3]))
    (spec,) = input_specs(model)
    assert spec == InputSpec("x", "float32", ("batch", 3, 8, 8))


def test_dynamic_dims_alternate_two_sizes_and_shared_params_agree():
    specs = [InputSpec("a", "float32", ("n", 3, None)), InputSpec("b", "float32", ("n", "t"))]
    batches = generate_inputs(specs, iterations=3)
    shapes = [(batch["a"].shape, batch["b"].shape) for batch in batches]
    first = (LEADING_DIM_SIZES[0], 3, OTHER_DIM_SIZES[0]), (LEADING_DIM_SIZES[0], OTHER_DIM_SIZES[0])
    second = (LEADING_DIM_SIZES[1], 3, OTHER_DIM_SIZES[1]), (LEADING_DIM_SIZES[1], OTHER_DIM_SIZES[1])
    assert shapes == [first, second, first]
    assert LEADING_DIM_SIZES[0] != LEADING_DIM_SIZES[1] and OTHER_DIM_SIZES[0] != OTHER_DIM_SIZES[1]


def test_dims_and_input_shapes_pin_sizes():
    specs = [InputSpec("a", "float32", ("n", 3, None)), InputSpec("b", "float32", ("n", "t"))]
    batches = generate_inputs(specs, iterations=2, dims={"n": 5}, input_shapes={"a": (5, 3, 7)})
    assert [(b["a"].shape, b["b"].shape) for b in batches] == [((5, 3, 7), (5, 32)), ((5, 3, 7), (5, 24))]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dims": {"batchsize": 2}}, "--dim batchsize: the model has no such symbolic dim (symbolic dims: n)"),
        ({"input_shapes": {"image": (1,)}}, "--input-shapes names 'image', not an input"),
        ({"input_shapes": {"a": (1, 3)}}, "--input-shapes a: rank 2 but the model declares rank 3"),
        ({"input_shapes": {"a": (1, 4, 2)}}, "--input-shapes a: axis 1 is fixed to 3 by the model, got 4"),
        ({"iterations": 0}, "iterations must be >= 1"),
    ],
)
def test_bad_shape_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate_inputs([InputSpec("a", "float32", ("n", 3, None))], **options)


def test_generation_is_seeded_and_dtype_aware():
    specs = [
        InputSpec("f16", "float16", (4,)),
        InputSpec("bf16", "bfloat16", (4,)),
        InputSpec("f64", "float64", (4,)),
        InputSpec("i64", "int64", (100,)),
        InputSpec("u8", "uint8", (100,)),
        InputSpec("flag", "bool", (100,)),
    ]
    first, again, other = (generate_inputs(specs, seed=seed, iterations=1)[0] for seed in (0, 0, 1))
    assert {name: array.dtype for name, array in first.items()} == {
        "f16": np.float16,
        "bf16": ml_dtypes.bfloat16,
        "f64": np.float64,
        "i64": np.int64,
        "u8": np.uint8,
        "flag": np.bool_,
    }
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["f64"], other["f64"])
    assert set(np.unique(first["i64"])) <= {0, 1, 2, 3}
    assert first["flag"].any() and not first["flag"].all()


def test_string_inputs_need_load_inputs():
    model = single_op_model("Identity", onnx.TensorProto.STRING, [2])
    with pytest.raises(UsageError, match=r"input 'x' has element type str, .* pass the inputs with --load-inputs"):
        verify(model, model)


def test_string_inputs_run_from_loaded_inputs_and_compare_exactly(tmp_path):
    model = single_op_model("Identity", onnx.TensorProto.STRING, [2])
    other = single_op_model("Identity", onnx.TensorProto.STRING, [2])
    constant = helper.make_tensor("constant", onnx.TensorProto.STRING, [2], [b"a", b"X"])
    other.graph.node.insert(0, helper.make_node("Constant", [], ["constant"], value=constant))
    other.graph.node[1].input[0] = "constant"  # y ignores x: ["a", "X"] instead of ["a", "B"]
    np.savez(tmp_path / "strings.npz", x=np.array(["a", "B"]))
    assert verify(model, model, load_inputs=tmp_path / "strings.npz").verdict is Verdict.PASSED
    report = verify(model, other, load_inputs=tmp_path / "strings.npz", atol={"y": 1e9})
    assert report.runs[0].outputs[0].unequal == 1
    assert report.verdicts[0].outputs[0].reasons == ("1 differing string element(s) in the candidate",)


def test_verify_exercises_dynamic_dims_with_two_sizes():
    model = conv_bn_chain(1, batch="batch", spatial="size")
    candidate, _ = folded(model)
    report = verify(model, candidate, iterations=2)
    assert report.verdict is Verdict.PASSED
    (record,) = report.inputs
    assert record.shapes == ((1, 3, 32, 32), (2, 3, 24, 24))
    assert report.runs[0].outputs[0].reference_shapes == ((1, 4, 32, 32), (2, 4, 24, 24))
    pinned = verify(model, candidate, iterations=2, dims={"batch": 3}, input_shapes=None)
    assert pinned.inputs[0].shapes == ((3, 3, 32, 32), (3, 3, 24, 24))


def test_inputs_round_trip_through_npz(tmp_path):
    model = conv_bn_chain(2)
    candidate, _ = folded(model)
    saved = verify(model, candidate, seed=7, save_inputs=tmp_path / "inputs.npz")
    with np.load(tmp_path / "inputs.npz") as archive:
        assert sorted(archive.files) == ["0/x", "1/x", "2/x"]
    loaded = verify(model, candidate, seed=123, load_inputs=tmp_path / "inputs.npz")
    assert loaded.runs[0].outputs == saved.runs[0].outputs
    assert loaded.inputs[0].source == "loaded" and loaded.seed is None
    batches = load_inputs(tmp_path / "inputs.npz", input_specs(model))
    regenerated = generate_inputs(input_specs(model), seed=7, iterations=3)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(batches, regenerated, strict=True))


def test_bfloat16_inputs_round_trip_and_run(tmp_path):
    model = single_op_model("Identity", onnx.TensorProto.BFLOAT16, ["n", 3])
    specs = input_specs(model)
    batches = generate_inputs(specs, iterations=2)
    save_inputs(tmp_path / "bf16.npz", batches)
    loaded = load_inputs(tmp_path / "bf16.npz", specs)
    assert loaded[0]["x"].dtype == ml_dtypes.bfloat16
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(batches, loaded, strict=True))
    report = verify(model, model, load_inputs=tmp_path / "bf16.npz")
    assert report.verdict is Verdict.PASSED
    assert report.runs[0].outputs[0].reference_dtype == "bfloat16"
    assert report.verdicts[0].outputs[0].tolerance.atol == 8e-2


def test_single_batch_npz_keyed_by_input_name(tmp_path):
    specs = [InputSpec("x", "float32", ("n", 2))]
    np.savez(tmp_path / "one.npz", x=np.ones((3, 2), np.float32))
    (batch,) = load_inputs(tmp_path / "one.npz", specs)
    assert batch["x"].shape == (3, 2)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((3, 2), np.float64)}, "input 'x' must be float32, the file holds float64"),
        ({"x": np.ones((3, 5), np.float32)}, "input 'x' axis 1 is 5, the model fixes it to 2"),
        ({"y": np.ones((3, 2), np.float32)}, "key 'y' is neither an input name"),
        ({"0/x": np.ones((1, 2), np.float32), "1/z": np.ones((1, 2), np.float32)}, "key '1/z'"),
    ],
)
def test_bad_npz_contents_are_usage_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        load_inputs(tmp_path / "bad.npz", [InputSpec("x", "float32", ("n", 2))])


def test_missing_or_corrupt_npz_is_a_usage_error(tmp_path):
    specs = [InputSpec("x", "float32", ("n", 2))]
    with pytest.raises(UsageError, match="no such file"):
        load_inputs(tmp_path / "missing.npz", specs)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UsageError, match=r"not a readable \.npz file"):
        load_inputs(tmp_path / "corrupt.npz", specs)


def test_integer_and_bool_inputs_feed_a_model_and_compare_exactly():
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["flag"], ["flag_int"], to=onnx.TensorProto.INT64),
            helper.make_node("Add", ["index", "flag_int"], ["y"]),
        ],
        "ints",
        [
            helper.make_tensor_value_info("index", onnx.TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, ["n"]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    report = verify(model, model)
    assert report.verdict is Verdict.PASSED
    assert report.verdicts[0].outputs[0].tolerance.atol == 0.0


def test_negative_dims_written_by_some_exporters_count_as_dynamic():
    """paddle2onnx writes -1 for a dynamic dim: inputs are generated for it instead of crashing."""
    import onnx
    from onnx import helper

    import bnfold

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "negative_dims",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = bnfold.verify(model, model)
    assert report.passed
