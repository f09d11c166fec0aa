"""Raw dynamo exports (``torch.onnx.export(..., dynamo=True, optimize=False)``) of zoo models fold every Conv→BN.

Such an export gives every bias-less Conv a zero bias computed at run time
(``Expand(CastLike(Constant 0, X), Expand(Shape(W, start=0, end=1), [1]))``). The constant evaluator
(``passes/constant_eval.py``) sees through it; the fold replaces the bias and prunes the chain. Also runs the
dynamo recipe of docs/rules.md verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from models_expectations import assert_sound_fold, fold_with_cli

import bnfold
from models.build import Variant, count_ops, prepared_model
from models.export import Exporter, quiet_exporters
from models.zoo import zoo_entry

RAW_DYNAMO = Variant(Exporter.DYNAMO, 18)
MODELS = ["resnet_basic", "mobilenet_v2"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def run_cpu(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def computed_bias_convs(model: ir.Model) -> int:
    """Convs whose bias is computed by a node (raw dynamo's zero-bias chain ends in an Expand)."""
    return sum(
        1
        for node in model.graph
        if node.op_type == "Conv"
        and len(node.inputs) > 2
        and node.inputs[2] is not None
        and node.inputs[2].producer() is not None
        and node.inputs[2].producer().op_type == "Expand"
    )


@pytest.mark.parametrize("name", MODELS)
def test_folds_every_conv_bn_of_raw_dynamo_export(zoo, name: str) -> None:
    original = ir.load(zoo.get(name, RAW_DYNAMO))
    original_proto = ir.to_proto(original)
    batch_norms = count_ops(original, "BatchNormalization")
    chains = computed_bias_convs(original)
    assert batch_norms > 0 and chains > 0  # the export still has the pattern this test is about
    expands, cast_likes = count_ops(original, "Expand"), count_ops(original, "CastLike")

    folded, report = bnfold.fold(original.clone())
    assert not report.skipped, report.to_json()
    assert len(report.folded) == batch_norms
    assert count_ops(folded, "BatchNormalization") == 0
    assert computed_bias_convs(folded) == 0
    # Each chain is Shape, Expand (shape), CastLike, Expand (bias) plus its Constants: all pruned.
    assert count_ops(folded, "Expand") == expands - 2 * chains
    assert count_ops(folded, "CastLike") == cast_likes - chains
    assert report.nodes_after <= report.nodes_before - batch_norms - 4 * chains
    # The folded weights keep their names although Shape(W) also read them (it reads the shape only).
    conv_weights = {node.inputs[1].name for node in original.graph if node.op_type == "Conv"}
    assert conv_weights == {node.inputs[1].name for node in folded.graph if node.op_type == "Conv"}

    folded_proto = ir.to_proto(folded)
    onnx.checker.check_model(folded_proto, full_check=True)
    entry = zoo_entry(name)
    x = np.random.default_rng(0).standard_normal((2, *entry.sample_shape)).astype(np.float32)
    (expected,), (actual,) = (
        run_cpu(original_proto, {entry.input_name: x}),
        run_cpu(folded_proto, {entry.input_name: x}),
    )
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert float(np.max(np.abs(expected - actual))) / scale <= 1e-4


def test_folds_raw_dynamo_export_through_the_cli_with_verification(zoo, tmp_path: Path) -> None:
    model = zoo.get("mobilenet_v2", RAW_DYNAMO)
    batch_norms = count_ops(ir.load(model), "BatchNormalization")
    result = fold_with_cli(model, tmp_path)
    assert_sound_fold(result, batch_norms)
    assert result.document["fold"]["batch_norm_folded"] == batch_norms


def docs_dynamo_recipe() -> str:
    """The python block of docs/rules.md's section "After torch.onnx.export(..., dynamo=True)"."""
    text = DOCS.read_text()
    section = text[text.index("### After `torch.onnx.export(..., dynamo=True)`") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the dynamo recipe has no python block"
    return match.group(1)


def test_docs_dynamo_recipe_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's ``assert not report.skipped`` holds on a zoo model, and the saved file is folded."""
    monkeypatch.chdir(tmp_path)
    entry = zoo_entry("resnet_basic")
    namespace = {"net": prepared_model(entry.name), "example": torch.zeros((2, *entry.sample_shape))}
    with quiet_exporters():
        exec(compile(docs_dynamo_recipe(), str(DOCS), "exec"), namespace)
    report = namespace["report"]
    assert len(report.folded) == count_ops(ir.load(tmp_path / "model.onnx"), "Conv") == 9
    assert count_ops(ir.load(tmp_path / "model.onnx"), "BatchNormalization") == 0
