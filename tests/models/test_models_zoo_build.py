"""The zoo builds deterministically, keeps BN with realistic state, and describes what it built."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from models_expectations import NEW_ARCHITECTURES, batchnorm_classes, expected_batchnorm_classes

from models.__main__ import main as models_main
from models.build import (
    MANIFEST_NAME,
    QUICK_MATRIX,
    Variant,
    build_model,
    build_zoo,
    count_ops,
    prepared_model,
)
from models.common import batchnorm_modules
from models.demo import DEMO_PATH
from models.export import STACK_TRACE_KEY, Exporter, export_model
from models.zoo import ZOO

TORCHSCRIPT_17 = Variant(Exporter.TORCHSCRIPT, 17)


def batchnorm_parameters(model: ir.Model) -> list[dict[str, np.ndarray]]:
    """γ, β, mean and var of every BN, read from initializers (TorchScript files keep them there)."""
    found = []
    for node in model.graph:
        if node.op_type == "BatchNormalization":
            names = ("scale", "bias", "mean", "var")
            found.append({key: value.const_value.numpy() for key, value in zip(names, node.inputs[1:], strict=True)})
    return found


@pytest.mark.parametrize("entry", ZOO, ids=lambda entry: entry.name)
def test_export_keeps_every_batchnorm_of_the_torch_model(zoo, entry) -> None:
    model = ir.load(zoo.get(entry.name, TORCHSCRIPT_17))
    assert count_ops(model, "BatchNormalization") == len(batchnorm_modules(prepared_model(entry.name)))
    assert count_ops(model, "BatchNormalization") > 0


@pytest.mark.parametrize("entry", ZOO, ids=lambda entry: entry.name)
def test_catalogue_counts_each_kind_of_batchnorm_as_exported(zoo, entry) -> None:
    """``ZooEntry``'s counts (unfoldable, Linear, forward into a Linear, LeViT, Concat) match the exported graph."""
    model = ir.load(zoo.get(entry.name, TORCHSCRIPT_17))
    batchnorm_count = count_ops(model, "BatchNormalization")
    assert batchnorm_classes(model) == expected_batchnorm_classes(entry, batchnorm_count)


@pytest.mark.parametrize(
    "name", ["resnet_basic", "densenet", "unet", "audio_cnn", "video_cnn", "mlp", *NEW_ARCHITECTURES]
)
def test_batchnorm_state_is_far_from_the_defaults(zoo, name: str) -> None:
    for params in batchnorm_parameters(ir.load(zoo.get(name, TORCHSCRIPT_17))):
        assert np.abs(params["scale"] - 1).max() > 0.1
        assert np.abs(params["bias"]).max() > 0.1
        assert np.abs(params["mean"]).max() > 0.05
        assert np.abs(params["var"] - 1).max() > 0.05
        assert params["var"].min() > 0


def test_rebuilding_gives_identical_bytes(tmp_path: Path) -> None:
    first = build_model("resnext", tmp_path / "first")
    prepared_model.cache_clear()  # construct and calibrate again from the seed
    second = build_model("resnext", tmp_path / "second")
    assert first.read_bytes() == second.read_bytes()


def test_build_zoo_writes_a_manifest_describing_each_file(tmp_path: Path) -> None:
    records = build_zoo(tmp_path, only=["audio_cnn"], quick=True)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert [record["variant"] for record in manifest["models"]] == [variant.tag for variant in QUICK_MATRIX]
    assert manifest["torch"] == torch.__version__.split("+")[0]
    for record in manifest["models"]:
        path = tmp_path / record["file"]
        assert path.is_file()
        assert record["model"] == "audio_cnn"
        assert record["family"] == "audio1d"
        assert record["batchnorm_count"] == 5
        assert record["size_bytes"] == path.stat().st_size
        assert record["input_shape"] == ["batch", 40, 98]
        assert record["opset"] == {"torchscript": 17, "dynamo": 18}[record["exporter"]]
    assert len(records) == len(QUICK_MATRIX)


def test_external_data_variant_stores_weights_beside_the_model(zoo) -> None:
    path = zoo.get("unet", Variant(Exporter.TORCHSCRIPT, 17, external_data=True))
    data = path.with_suffix(".data")
    assert data.is_file()
    assert data.stat().st_size > 4 * path.stat().st_size
    assert count_ops(ir.load(path), "BatchNormalization") == 12


def test_fp16_variant_stores_every_float_tensor_in_fp16(zoo) -> None:
    model = ir.load(zoo.get("resnet_basic", Variant(Exporter.TORCHSCRIPT, 17, "float16")))
    dtypes = {value.const_value.dtype for value in model.graph.initializers.values()}
    assert dtypes == {ir.DataType.FLOAT16}
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16


@pytest.mark.parametrize(("ir3", "ir_version"), [(False, 4), (True, 3)])
def test_initializers_as_inputs_variants_list_weights_as_graph_inputs(zoo, ir3: bool, ir_version: int) -> None:
    variant = Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True, ir3=ir3)
    model = ir.load(zoo.get("resnet_basic", variant))
    assert model.ir_version == ir_version
    input_names = {value.name for value in model.graph.inputs}
    assert set(model.graph.initializers) <= input_names
    assert len(input_names) == len(model.graph.initializers) + 1


def test_dynamo_export_keeps_batchnorm_and_drops_stack_traces(zoo) -> None:
    model = ir.load(zoo.get("mlp", Variant(Exporter.DYNAMO, 18, constant_folded=True)))
    assert count_ops(model, "BatchNormalization") == 2
    assert all(STACK_TRACE_KEY not in node.metadata_props for node in model.graph)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"name": "no_such_model"}, KeyError),
        ({"name": "mlp", "exporter": "dynamo", "opset": 13}, ValueError),
        ({"name": "mlp", "exporter": "torchscript", "opset": 23}, ValueError),
        ({"name": "mlp", "dtype": "bfloat16"}, ValueError),
        ({"name": "mlp", "constant_folded": True}, ValueError),
        ({"name": "mlp", "ir3": True}, ValueError),
        ({"name": "mlp", "exporter": "dynamo", "opset": 18, "initializers_as_inputs": True}, ValueError),
    ],
)
def test_build_model_rejects_impossible_requests(tmp_path: Path, arguments: dict, error: type) -> None:
    with pytest.raises(error):
        build_model(out_dir=tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_models_cli_rejects_an_unknown_model(tmp_path: Path, capsys) -> None:
    assert models_main(["build", str(tmp_path), "--only", "mlp", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_demo_model_is_bundled_small_and_realistic() -> None:
    model = ir.load(DEMO_PATH)
    assert DEMO_PATH.stat().st_size < 300_000
    assert model.opset_imports[""] == 17
    assert count_ops(model, "BatchNormalization") == 9
    assert [str(dim) for dim in model.graph.inputs[0].shape] == ["batch", "3", "32", "32"]
    for params in batchnorm_parameters(model):
        assert np.abs(params["var"] - 1).max() > 0.05
        assert np.abs(params["mean"]).max() > 0.05


@pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0", reason="bytes depend on torch's exporter")
def test_demo_command_reproduces_the_bundled_bytes(tmp_path: Path, capsys) -> None:
    rebuilt = tmp_path / "demo_resnet.onnx"
    assert models_main(["demo", "--output", str(rebuilt)]) == 0
    assert str(rebuilt) in capsys.readouterr().out
    assert rebuilt.read_bytes() == DEMO_PATH.read_bytes()


def test_export_refuses_a_model_in_training_mode() -> None:
    model = copy.deepcopy(prepared_model("mlp")).train()
    with pytest.raises(ValueError, match="eval-mode"):
        export_model(
            model,
            (torch.zeros(2, 64),),
            exporter=Exporter.TORCHSCRIPT,
            opset=17,
            input_names=("input",),
            output_names=("output",),
        )


def test_calibration_leaves_eval_mode_and_restores_momentum() -> None:
    model = prepared_model("resnet_basic")
    norms = batchnorm_modules(model)
    assert not model.training
    assert all(norm.momentum == 0.1 for norm in norms)
    assert all(int(norm.num_batches_tracked) == 4 for norm in norms)
