"""The README's demo model: ``models/demo_resnet.onnx``.

The zoo entry ``demo_resnet``: a small ResNet-style classifier (3×32×32 input, 10 classes; stem + three basic
blocks, two of them with a 1×1 projection shortcut) whose 9 BatchNormalization nodes carry randomised γ/β and
running statistics measured on shifted, scaled random data. Exported with the TorchScript exporter at opset
17 with BN preserved; input ``input`` ``[batch, 3, 32, 32]``, output ``logits`` ``[batch, 10]``; about
140 KB. Rebuild with ``python -m models demo``: the bytes are the same on every run with the same
torch/onnx-ir versions.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from models.build import Variant, export_variant
from models.export import Exporter
from models.zoo import zoo_entry

DEMO_PATH = Path(__file__).with_name("demo_resnet.onnx")
DEMO_VARIANT = Variant(Exporter.TORCHSCRIPT, 17, "float32")


def build_demo(path: Path = DEMO_PATH) -> Path:
    """Export the calibrated ``demo_resnet`` zoo entry to ``path`` (default ``models/demo_resnet.onnx``)."""
    exported = export_variant(zoo_entry("demo_resnet"), DEMO_VARIANT)
    exported.doc_string = "bnfold demo: small ResNet with BatchNormalization preserved (python -m models demo)"
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(exported, path)
    return path
