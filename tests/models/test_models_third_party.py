"""Opt-in: fold real models made by other exporters (Caffe2, PyTorch 0.3, paddle2onnx, tf2onnx).

The files come from installed PyPI distributions (see ``models/third_party.py`` and docs/models.md for their
provenance); nothing is copied into the repository. Run with::

    pip install --no-deps rapidocr-onnxruntime==1.4.4 magika==1.0.3   # optional; onnx's own are always there
    BNFOLD_THIRD_PARTY=1 python -m pytest tests/models/test_models_third_party.py -m slow
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import onnx_ir as ir
import pytest
from models_expectations import assert_sound_fold, fold_with_cli

from bnfold.cli import main
from bnfold.passes import SkipReason
from models.third_party import THIRD_PARTY, ThirdPartyModel, locate, provenance

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BNFOLD_THIRD_PARTY") != "1", reason="opt-in: set BNFOLD_THIRD_PARTY=1"),
]

#: Why each third-party BN that stays is expected to stay (keyed by model name; absent means "all fold").
EXPECTED_SKIPS: dict[str, dict[str, int]] = {
    # 58 pre-activation BNs read a Concat that the next dense layer reads too, 4 a pooling.
    "caffe2_densenet121": {SkipReason.PRODUCER_OUTPUT_SHARED.value: 58, SkipReason.UNSUPPORTED_PRODUCER.value: 4},
    "pytorch03_batchnorm2d": {SkipReason.NO_PRODUCER.value: 1},
    "pytorch03_batchnorm3d": {SkipReason.NO_PRODUCER.value: 1},
}

#: Third-party models bnfold is known to get wrong (strict xfail: they turn red once fixed).
KNOWN_FAILURES: dict[str, str] = {}


def cases() -> list:
    return [
        pytest.param(model, id=model.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[model.name])])
        if model.name in KNOWN_FAILURES
        else pytest.param(model, id=model.name)
        for model in THIRD_PARTY
    ]


def installed(model: ThirdPartyModel) -> Path:
    path = locate(model)
    if path is None:
        pytest.skip(
            f"{model.distribution} is not installed: pip install --no-deps {model.distribution}=={model.version}"
        )
    return path


def shape_arguments(model: ThirdPartyModel) -> list[str]:
    return [
        argument
        for name, shape in model.input_shapes
        for argument in ("--input-shapes", f"{name}:{','.join(map(str, shape))}")
    ]


def with_outputs(source: Path, names: list[str], destination: Path) -> Path:
    """A copy of ``source`` that also outputs the tensors ``names`` (compared where final outputs are flat)."""
    model = ir.load(source)
    values = {value.name: value for node in model.graph for value in node.outputs}
    model.graph.outputs.extend(values[name] for name in names if values[name] not in model.graph.outputs)
    ir.save(model, destination)
    return destination


@pytest.mark.parametrize("model", cases())
def test_folds_third_party_model(model: ThirdPartyModel, tmp_path: Path) -> None:
    path = installed(model)
    origin = provenance(model, path)
    assert origin["producer_name"] == model.producer, origin
    verification = shape_arguments(model) if model.runnable else ["--no-verify"]
    result = fold_with_cli(path, tmp_path, *verification)
    if not model.runnable:
        result.document["verify"] = {"verdict": "passed"}  # onnxruntime cannot run the original: fold only
    assert_sound_fold(result, model.expected_batchnorms)
    assert result.document["fold"]["skipped_by_reason"] == EXPECTED_SKIPS.get(model.name, {})
    (tmp_path / "provenance.json").write_text(json.dumps(origin, indent=2))


@pytest.mark.parametrize(
    "model", [m for m in THIRD_PARTY if m.runnable and m.expected_batchnorms], ids=lambda model: model.name
)
def test_third_party_batchnorm_outputs_match_after_folding(model: ThirdPartyModel, tmp_path: Path) -> None:
    if model.name in KNOWN_FAILURES:
        pytest.xfail(KNOWN_FAILURES[model.name])
    path = installed(model)
    result = fold_with_cli(path, tmp_path, "--no-verify")
    names = [record["output"] for record in result.folded_records]
    original = with_outputs(path, names, tmp_path / "original_probed.onnx")
    folded = with_outputs(result.folded, names, tmp_path / "folded_probed.onnx")
    report = tmp_path / "verify.json"
    with contextlib.redirect_stdout(io.StringIO()):
        exit_code = main(["verify", str(original), str(folded), "--json", str(report), *shape_arguments(model)])
    document = json.loads(report.read_text())
    assert exit_code == 0, document["verdict"]
    assert set(names) <= set(document["outputs"])
    compared = [
        output["errors"]["compared"]
        for provider in document["providers"]
        for output in provider["run"]["outputs"]
        if output["name"] in names
    ]
    assert len(compared) == len(names)
    assert min(compared) > 0
