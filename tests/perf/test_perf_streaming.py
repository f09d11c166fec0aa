"""The streaming fold: same result as the in-memory fold, tensors written once, inputs never touched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from perf_model_factory import conv_bn_chain

from bnfold import api
from bnfold.errors import InvalidModelError, UsageError
from bnfold.files import load, serialize, writer
from bnfold.files.load import files_size_bytes, load_model, open_lazily
from bnfold.files.serialize import EXTERNAL_DATA_THRESHOLD_BYTES
from bnfold.files.staging import save_model
from bnfold.workflow import FoldOptions, _spill_to, stage_fold


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def _in_memory_fold(path: Path) -> ir.Model:
    return api.fold(load_model(path))[0]


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    return conv_bn_chain(tmp_path / "ext.onnx", layers=4, channels=16, external=True, extra_untouched=True)


def test_external_fold_equals_in_memory_fold(external_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "folded.onnx"
    output.parent.mkdir()
    result = stage_fold(external_model, output)
    with result.staged as staged:
        staged.commit()
    assert len(result.report.folded) == 4
    folded = load_model(output)
    expected = _in_memory_fold(external_model)
    got, want = _arrays(folded), _arrays(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (output.parent / "folded.onnx.data").is_file()
    assert sorted(os.listdir(output.parent)) == ["folded.onnx", "folded.onnx.data"]


def test_untouched_tensor_bytes_are_copied_identically(external_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "folded.onnx"
    with stage_fold(external_model, output).staged as staged:
        staged.commit()
    source = load_model(external_model).graph.initializers["w_plain"].const_value
    copied = load_model(output).graph.initializers["w_plain"].const_value
    assert isinstance(copied, ir.ExternalTensor)
    assert copied.tobytes() == source.tobytes()
    assert copied.location == "folded.onnx.data"


def test_input_files_are_untouched(external_model: Path, tmp_path: Path) -> None:
    data = external_model.parent / "ext.onnx.data"
    before = (_digest(external_model), _digest(data))
    with stage_fold(external_model, tmp_path / "folded.onnx").staged as staged:
        staged.commit()
    assert (_digest(external_model), _digest(data)) == before


def test_folded_tensors_are_spilled_to_the_data_file_during_the_fold(external_model: Path, tmp_path) -> None:
    model = load_model(external_model)
    data = writer.DataFile(tmp_path / "spill.data")
    try:
        result = FoldOptions().make_pass(on_folded=_spill_to(data))(model)
    finally:
        data.close()
    assert len(result.report.folded) == 4
    weight = result.model.graph.initializers["w0"].const_value
    assert isinstance(weight, ir.ExternalTensor)
    assert Path(weight.path) == tmp_path / "spill.data"
    in_memory = [
        name
        for name, value in result.model.graph.initializers.items()
        if type(value.const_value) is ir.Tensor and value.const_value.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES
    ]
    assert in_memory == []
    np.testing.assert_array_equal(weight.numpy(), _arrays(_in_memory_fold(external_model))["w0"])


def test_in_place_fold_writes_a_new_data_file_and_keeps_the_old_one(external_model: Path) -> None:
    data = external_model.parent / "ext.onnx.data"
    original = data.read_bytes()
    result = stage_fold(external_model, external_model)
    with result.staged as staged:
        assert staged.data_name == "ext.onnx.1.data"
        assert staged.kept_data == (data.resolve(),)
        staged.commit()
    assert data.read_bytes() == original  # kept, never deleted nor written into (issue 14, defect 3)
    assert sorted(os.listdir(external_model.parent)) == ["ext.onnx", "ext.onnx.1.data", "ext.onnx.data"]
    again = stage_fold(external_model, external_model)
    with again.staged as staged:
        assert staged.data_name == "ext.onnx.2.data"  # ext.onnx.data exists: never replaced in place either
        assert len(again.report.folded) == 0
        staged.commit()
    assert data.read_bytes() == original
    np.testing.assert_array_equal(
        _arrays(load_model(external_model))["w0"], _arrays(_in_memory_fold_of_original(external_model))["w0"]
    )


def _in_memory_fold_of_original(path: Path) -> ir.Model:
    again = path.parent / "again" / "ext.onnx"
    rebuilt = conv_bn_chain(again, layers=4, channels=16, external=True, extra_untouched=True)
    return _in_memory_fold(rebuilt)


@pytest.fixture
def eager_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make small files take the lazy wire-scan path."""
    monkeypatch.setattr(load, "LAZY_FILE_BYTES", 0)
    monkeypatch.setattr(load, "LAZY_TENSOR_BYTES", 512)


def test_self_contained_file_is_read_lazily_and_written_self_contained(eager_threshold, tmp_path: Path) -> None:
    source = conv_bn_chain(tmp_path / "inline.onnx", layers=3, channels=16, extra_untouched=True)
    lazily = open_lazily(source)
    weight = lazily.graph.initializers["w0"].const_value
    assert isinstance(weight, ir.ExternalTensor)
    assert weight.location == "inline.onnx"
    np.testing.assert_array_equal(weight.numpy(), load_model(source).graph.initializers["w0"].const_value.numpy())
    assert files_size_bytes(source, lazily) == source.stat().st_size
    output = tmp_path / "out.onnx"
    with stage_fold(source, output).staged as staged:
        assert staged.data_name is None
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inline.onnx", "out.onnx"]
    proto = onnx.load(os.fspath(output))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    got, want = _arrays(load_model(output)), _arrays(_in_memory_fold(source))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_streamed_self_contained_file_equals_onnx_ir_save(tmp_path: Path) -> None:
    source = conv_bn_chain(tmp_path / "inline.onnx", layers=2, channels=32, extra_untouched=True)
    model = load_model(source)
    save_model(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "reference.onnx")
    streamed = onnx.load(os.fspath(tmp_path / "streamed.onnx"))
    reference = onnx.load(os.fspath(tmp_path / "reference.onnx"))
    by_name = {t.name: t for t in reference.graph.initializer}
    assert sorted(by_name) == sorted(t.name for t in streamed.graph.initializer)
    for tensor in streamed.graph.initializer:
        reference_bytes = by_name[tensor.name].SerializeToString(deterministic=True)
        assert tensor.SerializeToString(deterministic=True) == reference_bytes
    streamed.graph.ClearField("initializer")
    reference.graph.ClearField("initializer")
    # onnx_ir writes a value_info entry per initializer; bnfold keeps only those the source had (none here)
    assert not any(entry.name in by_name for entry in streamed.graph.value_info)
    for proto in (streamed, reference):  # (and the entries' order follows the initializer order, which differs)
        entries = sorted((e for e in proto.graph.value_info if e.name not in by_name), key=lambda entry: entry.name)
        proto.graph.ClearField("value_info")
        proto.graph.value_info.extend(entries)
    assert streamed.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)


def test_save_model_leaves_the_model_unchanged(external_model: Path, tmp_path: Path) -> None:
    model = load_model(external_model)
    before = {name: value.const_value for name, value in model.graph.initializers.items()}
    save_model(model, tmp_path / "copy.onnx", external_data=True)
    save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert {name: value.const_value for name, value in model.graph.initializers.items()} == before
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_array_equal(
        _arrays(load_model(tmp_path / "inline.onnx"))["w1"], _arrays(load_model(external_model))["w1"]
    )


def test_large_tensors_are_aligned_in_the_data_file(tmp_path: Path) -> None:
    data = writer.DataFile(tmp_path / "x.data")
    small = data.store(ir.tensor(np.ones(10, np.float32), name="small"))
    large = data.store(ir.tensor(np.arange(300_000, dtype=np.float32), name="large"))
    data.close()
    assert (small.offset, small.length) == (0, 40)
    assert large.offset == 4096
    assert large.length == 1_200_000
    np.testing.assert_array_equal(large.numpy(), np.arange(300_000, dtype=np.float32))
    assert data.store is not None and data.holds(large) and not data.holds(ir.tensor(np.ones(1), name="z"))


def test_self_contained_output_beyond_protobuf_limit_is_refused(monkeypatch, tmp_path: Path) -> None:
    source = conv_bn_chain(tmp_path / "inline.onnx", layers=2, channels=16)
    monkeypatch.setattr(serialize, "PROTOBUF_LIMIT_BYTES", 10_000)
    with pytest.raises(UsageError, match="exceed the 2 GiB protobuf limit"):
        save_model(load_model(source), tmp_path / "out.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inline.onnx"]


def test_wire_scan_falls_back_on_a_repeated_graph_field(eager_threshold, tmp_path: Path) -> None:
    source = conv_bn_chain(tmp_path / "inline.onnx", layers=2, channels=16)
    proto = onnx.load(os.fspath(source))
    extra = onnx.ModelProto()
    extra.graph.doc_string = "merged"
    source.write_bytes(proto.SerializeToString() + extra.SerializeToString())  # protobuf merges both
    model = open_lazily(source)
    assert model.graph.doc_string == "merged"
    assert not isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)


def test_wire_scan_rejects_a_truncated_file(eager_threshold, tmp_path: Path) -> None:
    source = conv_bn_chain(tmp_path / "inline.onnx", layers=2, channels=16)
    source.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(InvalidModelError, match=r"inline\.onnx"):
        open_lazily(source)


def test_missing_output_directory_is_a_usage_error(external_model: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        stage_fold(external_model, tmp_path / "nowhere" / "x.onnx")


def _forward_and_through_add_model(path: Path) -> Path:
    """input → BN0 → Conv0 (forward fold) → Conv1 → Add(const) → BN1 (fold through Add); external weights."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    channels = 16
    data_name = path.name + ".data"
    tensors = {
        "w0": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1,
        "w1": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1,
        "shift": rng.standard_normal((1, channels, 1, 1)).astype(np.float32),
    }
    for i in range(2):
        tensors[f"g{i}"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        tensors[f"b{i}"] = rng.normal(0, 0.2, channels).astype(np.float32)
        tensors[f"m{i}"] = rng.normal(0, 0.2, channels).astype(np.float32)
        tensors[f"v{i}"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    initializers = []
    with open(path.parent / data_name, "wb") as data:
        for name, array in tensors.items():
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            if array.nbytes >= 1024:
                tensor.data_location = TensorProto.EXTERNAL
                entries = (("location", data_name), ("offset", str(data.tell())), ("length", str(array.nbytes)))
                for key, value in entries:
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                data.write(array.tobytes())
            else:
                tensor.raw_data = array.tobytes()
            initializers.append(tensor)
    nodes = [
        helper.make_node("BatchNormalization", ["input", "g0", "b0", "m0", "v0"], ["n0"], name="bn0"),
        helper.make_node("Conv", ["n0", "w0"], ["c0"], name="conv0"),
        helper.make_node("Conv", ["c0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "shift"], ["a1"], name="add1"),
        helper.make_node("BatchNormalization", ["a1", "g1", "b1", "m1", "v1"], ["y"], name="bn1"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_forward_and_through_add_folds_are_spilled_and_equal_the_in_memory_fold(tmp_path: Path) -> None:
    source = _forward_and_through_add_model(tmp_path / "mixed.onnx")
    expected_model, expected_report = api.fold(load_model(source))
    data = writer.DataFile(tmp_path / "spill.data")
    try:
        result = FoldOptions().make_pass(on_folded=_spill_to(data))(load_model(source))
    finally:
        data.close()
    assert [record.folded for record in result.report.records] == [record.folded for record in expected_report.records]
    assert len(result.report.folded) == 2
    spilled_or_small = [
        name
        for name, value in result.model.graph.initializers.items()
        if type(value.const_value) is ir.Tensor and value.const_value.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES
    ]
    assert spilled_or_small == []
    got, want = _arrays(result.model), _arrays(expected_model)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
