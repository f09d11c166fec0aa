"""ONNX models made by *other* exporters, found inside installable PyPI packages (never copied into git).

Each :class:`ThirdPartyModel` names a distribution, the file's path inside it, and what produced the file.
:func:`locate` finds the file in the current environment (``None`` when the distribution is not installed);
:func:`provenance` describes the installed copy (version, hash, producer, IR and opsets) for reports.
Install the optional ones without their dependencies, which bnfold does not need::

    pip install --no-deps rapidocr-onnxruntime==1.4.4 magika==1.0.3

``onnx`` itself is a bnfold dependency, so its test data is always there. Its ``light`` models are real
Caffe2-exported model-zoo networks whose large weights were replaced by ``ConstantOfShape`` fills (the BN
parameters are real initializers); with constant weights their final outputs barely depend on the input,
so tests compare the BN output tensors too (see ``tests/models/test_models_third_party.py``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import onnx


@dataclass(frozen=True)
class ThirdPartyModel:
    """One third-party file.

    ``input_shapes`` (``name → shape``) fix dimensions the file leaves open where generated inputs would not
    fit the network; ``runnable`` is False when onnxruntime cannot load the original (then only folding is
    checked); ``expected_batchnorms`` is the number of BN nodes in the version listed in ``version``.
    """

    name: str
    distribution: str
    version: str
    path: str
    producer: str
    expected_batchnorms: int
    note: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    runnable: bool = True


_LIGHT = "onnx/backend/test/data/light"
_PYTORCH_03 = "onnx/backend/test/data/pytorch-converted"
_RAPIDOCR = "rapidocr_onnxruntime/models"

THIRD_PARTY: tuple[ThirdPartyModel, ...] = (
    ThirdPartyModel(
        "caffe2_resnet50",
        "onnx",
        "1.23.2",
        f"{_LIGHT}/light_resnet50.onnx",
        "onnx-caffe2",
        53,
        "ResNet-50 from Caffe2; IR 3, initializers listed as inputs, weights as ConstantOfShape",
    ),
    ThirdPartyModel(
        "caffe2_shufflenet",
        "onnx",
        "1.23.2",
        f"{_LIGHT}/light_shufflenet.onnx",
        "onnx-caffe2",
        49,
        "ShuffleNet v1 from Caffe2; grouped convs, channel shuffle",
    ),
    ThirdPartyModel(
        "caffe2_inception_v2",
        "onnx",
        "1.23.2",
        f"{_LIGHT}/light_inception_v2.onnx",
        "onnx-caffe2",
        69,
        "Inception v2 (BN-Inception) from Caffe2",
    ),
    ThirdPartyModel(
        "caffe2_densenet121",
        "onnx",
        "1.23.2",
        f"{_LIGHT}/light_densenet121.onnx",
        "onnx-caffe2",
        121,
        "DenseNet-121 converted from Caffe: pre-activation BN, each BN followed by a Caffe "
        "Scale layer exported as Mul/Add",
    ),
    ThirdPartyModel(
        "pytorch03_batchnorm2d",
        "onnx",
        "1.23.2",
        f"{_PYTORCH_03}/test_BatchNorm2d_eval/model.onnx",
        "pytorch",
        1,
        "PyTorch 0.3: opset 6 BN (is_test=1) reading the graph input; onnxruntime has no opset-6 BN kernel",
        runnable=False,
    ),
    ThirdPartyModel(
        "pytorch03_batchnorm3d",
        "onnx",
        "1.23.2",
        f"{_PYTORCH_03}/test_BatchNorm3d_momentum_eval/model.onnx",
        "pytorch",
        1,
        "PyTorch 0.3: opset 6 BatchNorm3d, epsilon 1e-3",
        runnable=False,
    ),
    ThirdPartyModel(
        "paddle_ppocr_cls",
        "rapidocr-onnxruntime",
        "1.4.4",
        f"{_RAPIDOCR}/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "PaddlePaddle",
        35,
        "PP-OCR text-direction classifier (MobileNetV3), paddle2onnx, opset 11; input dims stored as -1",
        input_shapes=(("x", (1, 3, 48, 192)),),
    ),
    ThirdPartyModel(
        "paddle_ppocrv4_det",
        "rapidocr-onnxruntime",
        "1.4.4",
        f"{_RAPIDOCR}/ch_PP-OCRv4_det_infer.onnx",
        "",
        3,
        "PP-OCRv4 text detector (DB head with ConvTranspose), paddle2onnx, opset 12",
        input_shapes=(("x", (1, 3, 64, 64)),),
    ),
    ThirdPartyModel(
        "paddle_ppocrv4_rec",
        "rapidocr-onnxruntime",
        "1.4.4",
        f"{_RAPIDOCR}/ch_PP-OCRv4_rec_infer.onnx",
        "",
        6,
        "PP-OCRv4 text recogniser (SVTR-LCNet), paddle2onnx, opset 12",
        input_shapes=(("x", (1, 3, 48, 160)),),
    ),
    ThirdPartyModel(
        "tf2onnx_magika",
        "magika",
        "1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "tf2onnx",
        0,
        "Magika file-type classifier converted from Keras with tf2onnx 1.16; no BN (a control: "
        "nothing to fold, output unchanged)",
    ),
)


def third_party_model(name: str) -> ThirdPartyModel:
    """The catalogue entry called ``name`` (``KeyError`` otherwise)."""
    for model in THIRD_PARTY:
        if model.name == name:
            return model
    raise KeyError(f"unknown third-party model {name!r}; known: {', '.join(m.name for m in THIRD_PARTY)}")


def locate(model: ThirdPartyModel) -> Path | None:
    """The installed file, or ``None`` when its distribution (or the file in it) is not installed."""
    try:
        distribution = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(model.path)))
    return path if path.is_file() else None


def provenance(model: ThirdPartyModel, path: Path) -> dict[str, object]:
    """Where the installed copy comes from and what made it (JSON-serialisable)."""
    proto = onnx.load(path, load_external_data=False)
    return {
        "name": model.name,
        "distribution": model.distribution,
        "installed_version": importlib.metadata.version(model.distribution),
        "path_in_distribution": model.path,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "producer_name": proto.producer_name,
        "producer_version": proto.producer_version,
        "ir_version": proto.ir_version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import},
    }
