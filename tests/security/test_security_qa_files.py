"""QA pass H12, file handling: external data kept by the API (D5), internal errors not shown as invalid models
(D6), nothing folded means nothing changed (D9).

- D5: ``bnfold.save_model`` keeps the input's external-data layout even after the fold replaced every external
  tensor (the loader remembers the layout in ``model.meta``);
- D6: only bytes that are not a model give "not a valid ONNX model" (exit 3); a bug in bnfold is an internal
  error with its own exit code, 70;
- D9: a model with nothing folded is written back as the input's bytes; onnx_ir's ``value_info`` entries for
  initializers are not added to any output; the batch total does not count such a model as "folded".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from security_support import CliResult, with_external_data, write_model

import bnfold
from bnfold.errors import ExitCode, InvalidModelError
from bnfold.files import load
from bnfold.files.load import INITIALIZER_INFO_META, SOURCE_EXTERNAL_META, load_model

RNG = np.random.default_rng(7)
X = RNG.standard_normal((1, 16, 5, 5)).astype(np.float32)


def _bn_initializers(prefix: str, channels: int) -> list[TensorProto]:
    arrays = {
        "gamma": RNG.uniform(0.5, 1.5, channels),
        "beta": RNG.standard_normal(channels),
        "mean": RNG.standard_normal(channels),
        "var": RNG.uniform(0.2, 2.0, channels),
    }
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{n}") for n, a in arrays.items()]


def _bn(prefix: str, source: str, output: str) -> onnx.NodeProto:
    params = [f"{prefix}_{n}" for n in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [source, *params], [output], name=prefix)


def conv_bn_model() -> onnx.ModelProto:
    """``X[1,16,5,5] → Conv(16→16, 3x3: 9 KiB of weights) → BN → Y``: one foldable BN, a folded weight large
    enough to go to an external-data file."""
    weight = numpy_helper.from_array((RNG.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("bn", "c", "Y")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16, 5, 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16, 5, 5])],
        [weight, *_bn_initializers("bn", 16)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unfoldable_model() -> onnx.ModelProto:
    """``X → Conv → BN → Y`` with the Conv output also a graph output: the BN cannot be folded, nothing changes."""
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 16, 5, 5]))
    return model


def run_ort(path: Path) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["Y"], {"X": X})


def external_locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


# --- D5: the API keeps external data ----------------------------------------------------------------------------


def test_api_save_keeps_external_data_after_every_external_tensor_folded(tmp_path: Path) -> None:
    model, data = with_external_data(conv_bn_model(), "source.bin")
    write_model(tmp_path / "model.onnx", model)
    (tmp_path / "source.bin").write_bytes(data)
    folded, report = bnfold.fold(tmp_path / "model.onnx")
    assert len(report.folded) == 1
    assert not load.has_external_data(folded)  # every external tensor was folded: the layout comes from meta
    assert folded.meta[SOURCE_EXTERNAL_META] is True
    bnfold.save_model(folded, tmp_path / "out.onnx")
    assert external_locations(tmp_path / "out.onnx") == {"out.onnx.data"}
    assert (tmp_path / "out.onnx.data").stat().st_size >= 16 * 16 * 9 * 4
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["Conv"]
    np.testing.assert_allclose(run_ort(tmp_path / "out.onnx")[0], run_ort(tmp_path / "model.onnx")[0], atol=1e-5)


def test_api_save_keeps_a_self_contained_input_self_contained(tmp_path: Path) -> None:
    write_model(tmp_path / "model.onnx", conv_bn_model())
    folded, report = bnfold.fold(tmp_path / "model.onnx")
    assert len(report.folded) == 1 and folded.meta[SOURCE_EXTERNAL_META] is False
    bnfold.save_model(folded, tmp_path / "out.onnx")
    assert external_locations(tmp_path / "out.onnx") == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def test_api_save_over_the_input_keeps_external_data_and_the_old_data_file(tmp_path: Path) -> None:
    model, data = with_external_data(conv_bn_model(), "model.onnx.data")
    write_model(tmp_path / "model.onnx", model)
    (tmp_path / "model.onnx.data").write_bytes(data)
    folded, _ = bnfold.fold(tmp_path / "model.onnx")
    bnfold.save_model(folded, tmp_path / "model.onnx")
    assert external_locations(tmp_path / "model.onnx") == {"model.onnx.1.data"}  # never the file it read
    assert (tmp_path / "model.onnx.data").read_bytes() == data
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)


# --- D6: internal errors are not invalid models -----------------------------------------------------------------


def test_bytes_that_are_not_a_model_are_an_invalid_model(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidModelError, match="not a valid ONNX model"):
        load_model(tmp_path / "junk.onnx")


def test_a_bug_while_parsing_is_not_reported_as_an_invalid_model(tmp_path: Path, monkeypatch) -> None:
    write_model(tmp_path / "model.onnx", conv_bn_model())

    def broken(_: bytes) -> onnx.ModelProto:
        raise TypeError("expected str, bytes or os.PathLike object, not int")

    monkeypatch.setattr(load.onnx, "load_model_from_string", broken)
    with pytest.raises(TypeError):
        load_model(tmp_path / "model.onnx")


def test_an_internal_error_exits_70_and_says_so(tmp_path: Path, monkeypatch, run_cli: Callable[..., CliResult]) -> None:
    write_model(tmp_path / "model.onnx", conv_bn_model())

    def broken(_: bytes) -> onnx.ModelProto:
        raise NameError("name 'itertools' is not defined")

    monkeypatch.setattr(load.onnx, "load_model_from_string", broken)
    result = run_cli("fold", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--no-verify", "-q")
    assert result.code == ExitCode.INTERNAL == 70
    assert result.stderr_lines[0].startswith("bnfold: internal error on ") and "NameError" in result.stderr
    assert "not a valid ONNX model" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_invalid_model_still_exits_3(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"hello\n")
    result = run_cli("fold", tmp_path / "junk.onnx", "-o", tmp_path / "out.onnx", "-q")
    assert result.code == ExitCode.INVALID_MODEL
    assert "not a valid ONNX model" in result.stderr and "internal error" not in result.stderr


def test_an_internal_error_in_a_batch_worker_exits_70(tmp_path: Path, monkeypatch) -> None:
    from bnfold import batch
    from bnfold.workflow import FoldOptions

    def broken(*_: object, **__: object) -> None:
        raise NameError("name 'itertools' is not defined")

    monkeypatch.setattr(batch, "fold_file", broken)
    job = batch.FoldJob(str(tmp_path / "a.onnx"), str(tmp_path / "out" / "a.onnx"))
    outcome = batch.run_job(job, FoldOptions())
    assert outcome.exit_code == ExitCode.INTERNAL and outcome.error.startswith("internal error: NameError")


@pytest.mark.parametrize("command", ["fold", "check", "verify"])
def test_help_lists_the_internal_error_code(command: str, run_cli: Callable[..., CliResult]) -> None:
    result = run_cli(command, "--help")
    assert "70 internal error" in result.stdout.split("exit codes:")[1]


# --- D9: nothing folded, nothing changed ------------------------------------------------------------------------


def test_skips_when_unfoldable_and_writes_the_input_bytes(tmp_path: Path, run_cli: Callable[..., CliResult]) -> None:
    source = write_model(tmp_path / "model.onnx", unfoldable_model())
    report = bnfold.check(source)
    assert not report.folded and len(report.skipped) == 1
    result = run_cli(source, "-o", tmp_path / "out.onnx", "-q")  # (verified: the default)
    assert result.code == 0, result.stderr
    assert (tmp_path / "out.onnx").read_bytes() == source.read_bytes()


def test_skips_when_unfoldable_in_place_leaves_the_file_as_it_was(
    tmp_path: Path, run_cli: Callable[..., CliResult]
) -> None:
    source = write_model(tmp_path / "model.onnx", unfoldable_model())
    before = source.read_bytes()
    result = run_cli(source, "--in-place", "--no-verify", "-q")
    assert result.code == 0, result.stderr
    assert source.read_bytes() == before


def test_folds_without_adding_value_info_for_initializers(tmp_path: Path) -> None:
    write_model(tmp_path / "model.onnx", conv_bn_model())
    outcome = bnfold.fold_file(tmp_path / "model.onnx", tmp_path / "out.onnx")
    assert len(outcome.report.folded) == 1
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [info.name for info in written.graph.value_info] == []
    onnx.checker.check_model(written, full_check=True)
    np.testing.assert_allclose(run_ort(tmp_path / "out.onnx")[0], run_ort(tmp_path / "model.onnx")[0], atol=1e-5)


def test_value_info_the_source_declared_for_an_initializer_is_kept(tmp_path: Path) -> None:
    model = unfoldable_model()
    model.graph.value_info.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 16, 3, 3]))
    write_model(tmp_path / "model.onnx", model)
    loaded = load_model(tmp_path / "model.onnx")
    assert loaded.meta[INITIALIZER_INFO_META] == frozenset({"W"})
    bnfold.save_model(loaded, tmp_path / "out.onnx")
    assert [info.name for info in onnx.load(str(tmp_path / "out.onnx")).graph.value_info] == ["W"]


def test_load_and_save_of_an_unchanged_model_adds_no_value_info(tmp_path: Path) -> None:
    write_model(tmp_path / "model.onnx", unfoldable_model())
    bnfold.save_model(load_model(tmp_path / "model.onnx"), tmp_path / "out.onnx")
    saved, source = onnx.load(str(tmp_path / "out.onnx")), onnx.load(str(tmp_path / "model.onnx"))
    assert len(saved.graph.value_info) == len(source.graph.value_info) == 0
    assert (tmp_path / "out.onnx").stat().st_size <= (tmp_path / "model.onnx").stat().st_size + 16


def test_batch_total_does_not_count_a_model_with_nothing_folded_as_folded(
    tmp_path: Path, run_cli: Callable[..., CliResult]
) -> None:
    write_model(tmp_path / "a.onnx", conv_bn_model())
    write_model(tmp_path / "b.onnx", unfoldable_model())
    (tmp_path / "out").mkdir()
    result = run_cli(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "out", "-j", "1", "--no-verify")
    assert result.code == 0, result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("total: "))
    assert total.startswith("total: 2/2 models succeeded (1 with a BN folded), 0 failed, 1/2 BN folded, "), total
    assert (tmp_path / "out" / "b.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
