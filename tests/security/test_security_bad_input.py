"""Bad input, clean answer: every subcommand, every kind of broken file.

For each hostile file and each subcommand that reads a model: the documented exit code (3: invalid model), one
line on stderr that names the file, no traceback (``--debug`` shows one), nothing written next to the input
(no output, no temporary leftovers) and the input byte-for-byte unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from security_support import conv_bn_model, run_subprocess, snapshot, write_model

from bnfold.cli import _available_commands
from fuzz import seeds

AVAILABLE = set(_available_commands())


def _model_bytes() -> bytes:
    return conv_bn_model().SerializeToString()


def missing(directory: Path) -> Path:
    return directory / "absent.onnx"


def a_directory(directory: Path) -> Path:
    (directory / "folder.onnx").mkdir()
    return directory / "folder.onnx"


def empty_file(directory: Path) -> Path:
    (directory / "empty.onnx").write_bytes(b"")
    return directory / "empty.onnx"


def random_bytes(directory: Path) -> Path:
    (directory / "random.onnx").write_bytes(random.Random(8).randbytes(4096))
    return directory / "random.onnx"


def truncated_protobuf(directory: Path) -> Path:
    data = _model_bytes()
    (directory / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return directory / "truncated.onnx"


def protobuf_not_a_model(directory: Path) -> Path:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="just_a_node")  # a valid NodeProto, not a model
    (directory / "node.onnx").write_bytes(node.SerializeToString())
    return directory / "node.onnx"


def _edited(directory: Path, name: str, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = conv_bn_model()
    edit(model)
    return write_model(directory / name, model)


def dangling_input(directory: Path) -> Path:
    return _edited(directory, "dangling.onnx", lambda m: m.graph.node[0].input.__setitem__(0, "nowhere"))


def cycle(directory: Path) -> Path:
    return _edited(directory, "cycle.onnx", lambda m: m.graph.node[0].input.__setitem__(0, "Y"))


def duplicate_outputs(directory: Path) -> Path:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.node.append(helper.make_node("Identity", ["X"], ["conv_out"], name="second_producer"))

    return _edited(directory, "duplicate.onnx", edit)


def unproduced_graph_output(directory: Path) -> Path:
    return _edited(directory, "no_producer.onnx", lambda m: setattr(m.graph.output[0], "name", "ghost"))


def _weight_with_dims(dims: list[int]) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        weight = model.graph.initializer[0]
        del weight.dims[:]
        weight.dims.extend(dims)

    return edit


def huge_initializer_dims(directory: Path) -> Path:
    """36 TiB declared, 864 bytes held."""
    return _edited(directory, "huge_weight.onnx", _weight_with_dims([2**20, 2**20, 3, 3]))


def unrepresentable_initializer_dims(directory: Path) -> Path:
    """More bytes than a 64-bit address space has."""
    return _edited(directory, "unrepresentable_weight.onnx", _weight_with_dims([2**40, 2**40, 3, 3]))


def wrong_attribute_type(directory: Path) -> Path:
    def edit(model: onnx.ModelProto) -> None:
        bn = model.graph.node[1]
        bn.attribute.append(helper.make_attribute("epsilon", [1, 2]))

    return _edited(directory, "bad_attribute.onnx", edit)


def invalid_utf8_name(directory: Path) -> Path:
    data = _model_bytes().replace(b"conv_out", b"conv\xffout")
    (directory / "bad_text.onnx").write_bytes(data)
    return directory / "bad_text.onnx"


def unknown_data_type(directory: Path) -> Path:
    return _edited(directory, "bad_dtype.onnx", lambda m: setattr(m.graph.initializer[1], "data_type", 99))


HOSTILE = {
    "missing": (missing, "no such file"),
    "directory": (a_directory, "not a regular file"),
    "empty": (empty_file, "empty file"),
    "random_bytes": (random_bytes, "not"),
    "truncated": (truncated_protobuf, "not"),
    "not_a_model": (protobuf_not_a_model, "no graph"),
    "dangling_input": (dangling_input, "'nowhere'"),
    "cycle": (cycle, "cycle"),
    "duplicate_outputs": (duplicate_outputs, "'conv_out'"),
    "unproduced_output": (unproduced_graph_output, "'ghost'"),
    "huge_dims": (huge_initializer_dims, "needs 39582418599936 bytes"),
    "unrepresentable_dims": (unrepresentable_initializer_dims, "too large to represent"),
    "wrong_attribute_type": (wrong_attribute_type, "'epsilon'"),
    "invalid_utf8": (invalid_utf8_name, "UTF-8"),
    "unknown_dtype": (unknown_data_type, "data type 99"),
}


def _argv(command: str, model: Path, good: Path, output: Path) -> list[object]:
    return {
        "fold": ["fold", model, "-o", output],
        "default": [model, "-o", output],
        "fold-in-place": ["fold", model, "--in-place"],
        "check": ["check", model],
        "verify-original": ["verify", model, good],
        "verify-candidate": ["verify", good, model],
        "lower-training": ["lower-training", model, "-o", output],
    }[command]


# Test id → the subcommand it needs.
COMMANDS = {
    "fold": "fold",
    "default": "fold",
    "fold-in-place": "fold",
    "check": "check",
    "verify-original": "verify",
    "verify-candidate": "verify",
    "lower-training": "lower-training",
}
LOADER_COMMANDS = {"fold", "default", "fold-in-place", "check", "lower-training"}


def _setup(tmp_path: Path, builder: Callable[[Path], Path]) -> tuple[Path, Path, Path]:
    good = write_model(tmp_path / "good.onnx", conv_bn_model())
    return builder(tmp_path), good, tmp_path / "out.onnx"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_model_gets_one_line_and_exit_3(
    run_cli, request: pytest.FixtureRequest, tmp_path: Path, kind: str, command: str
) -> None:
    if COMMANDS[command] not in AVAILABLE:
        pytest.skip(f"subcommand {COMMANDS[command]!r} is not available")
    builder, reason = HOSTILE[kind]
    model, good, output = _setup(tmp_path, builder)
    before = snapshot(tmp_path)

    result = run_cli(*_argv(command, model, good, output))

    assert result.code == 3, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("bnfold: error: "), line
    assert str(model) in line
    if command in LOADER_COMMANDS:
        assert reason in line
    assert "Traceback" not in result.stderr and "internal error" not in line
    assert not output.exists()
    assert snapshot(tmp_path) == before  # input unchanged, no temporary files left behind


@pytest.mark.parametrize("kind", ["random_bytes", "cycle", "huge_dims"])
def test_debug_flag_shows_the_traceback(run_cli, tmp_path: Path, kind: str) -> None:
    model, _good, output = _setup(tmp_path, HOSTILE[kind][0])
    result = run_cli("fold", model, "-o", output, "--debug")
    assert result.code == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "InvalidModelError" in result.stderr
    assert result.stderr_lines[-1].startswith("bnfold: error: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["fold", "{model}", "-o", "{out}"],
        ["{model}"],
        ["check", "{model}"],
        ["verify", "{model}", "{good}"],
        ["lower-training", "{model}", "-o", "{out}"],
    ],
    ids=["fold", "default", "check", "verify", "lower-training"],
)
def test_no_traceback_reaches_stderr_of_a_real_process(tmp_path: Path, argv: list[str]) -> None:
    model, good, output = _setup(tmp_path, random_bytes)
    before = snapshot(tmp_path)
    filled = [part.format(model=model, good=good, out=output) for part in argv]
    result = run_subprocess(*filled)
    assert result.code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and str(model) in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_debug_traceback_in_a_real_process(tmp_path: Path) -> None:
    model, _good, output = _setup(tmp_path, dangling_input)
    result = run_subprocess("fold", model, "-o", output, "--debug")
    assert result.code == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "reads 'nowhere', which nothing defines" in result.stderr_lines[-1]


def test_usage_errors_exit_2_with_one_line(run_cli, tmp_path: Path) -> None:
    good = write_model(tmp_path / "good.onnx", conv_bn_model())
    for argv in (
        ["fold", good, "--in-place", "-o", tmp_path / "x.onnx"],
        ["fold", good, "--only", "no_such_rule", "-o", tmp_path / "x.onnx"],
        ["fold", good, "-o", tmp_path / "missing_dir" / "x.onnx"],
        ["fold", good, "--no-such-flag"],
    ):
        result = run_cli(*argv)
        assert result.code == 2, (argv, result.stderr)
        assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith("bnfold: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]


# --- unusual but valid models: fold around what is not understood ------------------------------------------


def test_unknown_domain_op_is_folded_around(run_cli, tmp_path: Path) -> None:
    model = write_model(tmp_path / "custom.onnx", seeds.subgraph_and_custom())
    output = tmp_path / "out.onnx"
    result = run_cli("fold", model, "-o", output, "--no-verify", "--json", "-")
    assert result.code == 0, result.stderr
    folded = onnx.load(output)
    assert [node.op_type for node in folded.graph.node] == ["If", "Mystery", "BatchNormalization"]
    branch = next(attribute.g for attribute in folded.graph.node[0].attribute if attribute.name == "then_branch")
    assert [node.op_type for node in branch.node] == ["Conv"]
    onnx.checker.check_model(folded)


def test_unknown_domain_op_with_verification_is_a_clean_error(run_cli, tmp_path: Path) -> None:
    model = write_model(tmp_path / "custom.onnx", seeds.subgraph_and_custom())
    before = snapshot(tmp_path)
    result = run_cli("fold", model, "-o", tmp_path / "out.onnx")
    assert result.code in (1, 2, 3), result.stderr
    assert len(result.stderr_lines) == 1 and str(model) in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_opset_newer_than_onnx_knows_is_folded(run_cli, tmp_path: Path) -> None:
    source = conv_bn_model()
    source.opset_import[0].version = 99
    model = write_model(tmp_path / "future.onnx", source)
    output = tmp_path / "out.onnx"
    result = run_cli("fold", model, "-o", output, "--no-verify")
    assert result.code == 0, result.stderr
    folded = onnx.load(output)
    assert folded.opset_import[0].version == 99
    assert [node.op_type for node in folded.graph.node] == ["Conv"]


def test_opset_newer_than_onnx_knows_check_reports_foldable(run_cli, tmp_path: Path) -> None:
    if "check" not in AVAILABLE:
        pytest.skip("no check subcommand")
    source = conv_bn_model()
    source.opset_import[0].version = 99
    model = write_model(tmp_path / "future.onnx", source)
    result = run_cli("check", model)
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr


def _huge_declared_input(directory: Path) -> Path:
    source = conv_bn_model()
    for value in (source.graph.input[0], source.graph.output[0]):
        value.type.tensor_type.shape.dim[2].dim_value = 2**31
    return write_model(directory / "huge_input.onnx", source)


def test_huge_declared_input_dims_fold_without_allocating(run_cli, tmp_path: Path) -> None:
    model = _huge_declared_input(tmp_path)
    result = run_cli("fold", model, "-o", tmp_path / "out.onnx", "--no-verify")
    assert result.code == 0, result.stderr
    assert onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim[2].dim_value == 2**31


def test_huge_declared_input_dims_verification_refused_cleanly(run_cli, tmp_path: Path) -> None:
    model = _huge_declared_input(tmp_path)
    result = run_cli("fold", model, "-o", tmp_path / "out.onnx")
    assert result.code in (2, 3), result.stderr
    assert "internal error" not in result.stderr and len(result.stderr_lines) == 1


def test_model_proto_api_rejects_hostile_graph() -> None:
    from bnfold import api
    from bnfold.errors import InvalidModelError

    model = conv_bn_model()
    model.graph.node[0].input[0] = "Y"
    with pytest.raises(InvalidModelError, match="cycle through node 'conv'"):
        api.fold(model)


def test_string_tensor_with_raw_data_is_refused(tmp_path: Path) -> None:
    from bnfold.errors import InvalidModelError
    from bnfold.files import load_model

    model = conv_bn_model()
    model.graph.initializer.append(TensorProto(name="s", data_type=TensorProto.STRING, dims=[1], raw_data=b"ab"))
    path = write_model(tmp_path / "strings.onnx", model)
    with pytest.raises(InvalidModelError, match="string tensor with raw_data"):
        load_model(path)


def test_check_with_one_hostile_model_among_good_ones_names_it(run_cli, tmp_path: Path) -> None:
    if "check" not in AVAILABLE:
        pytest.skip("no check subcommand")
    good = write_model(tmp_path / "good.onnx", conv_bn_model())
    bad = random_bytes(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("check", good, bad)
    assert result.code == 3, result.stderr
    assert len(result.stderr_lines) == 1 and str(bad) in result.stderr_lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["directory", "missing_parent"])
def test_doctor_unwritable_json_is_a_usage_error(run_cli, tmp_path: Path, where: str) -> None:
    if "doctor" not in AVAILABLE:
        pytest.skip("no doctor subcommand")
    target = tmp_path if where == "directory" else tmp_path / "missing" / "report.json"
    result = run_cli("doctor", "--providers", "cpu", "--json", target)
    assert result.code == 2, result.stderr
    assert len(result.stderr_lines) == 1 and str(target).rstrip("/") in result.stderr_lines[0]
    assert "Traceback" not in result.stderr


def test_batch_fold_reports_the_hostile_model_and_folds_the_others(run_cli, tmp_path: Path) -> None:
    good = write_model(tmp_path / "good.onnx", conv_bn_model())
    bad = cycle(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("fold", bad, good, out, "--no-verify")
    assert result.code == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert f"{bad}: error: {bad}: graph 'seed': the graph has a cycle through node 'conv'" in report
    assert sorted(path.name for path in out.iterdir()) == ["good.onnx"]
    assert [node.op_type for node in onnx.load(out / "good.onnx").graph.node] == ["Conv"]
