"""The zoo's catalogue: one :class:`ZooEntry` per architecture, in a fixed order.

Each entry knows how to construct its torch module, the shape of one input sample (without the batch
dimension), and the input/output names used in the exported files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.audio import audio_cnn
from models.convmixer import convmixer
from models.densenet import densenet
from models.efficientnet import efficientnet_b0
from models.face_head import face_head
from models.levit import levit
from models.mixnet import mixnet
from models.mlp import mlp
from models.mobilenet import mobilenet_v2, mobilenet_v3
from models.resnet import demo_resnet, resnet_basic, resnet_bottleneck, resnext
from models.shufflenet import shufflenet_v2
from models.unet import unet
from models.video import video_cnn


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    ``family`` groups entries in reports; ``producers`` names the ops the exported BNs follow;
    ``seed`` fixes construction and calibration; ``note`` says what the entry exercises.

    The counts sort the BNs by how they can be folded, from the architecture alone (each BN in one class;
    ``tests/models`` checks them against the exported graph):

    - ``unfoldable_batchnorms``: no linear neighbour to fold into in either direction (pre-activation BNs
      reading a Concat or a pooling that feeds a ReLU; ConvMixer's BNs after GELU that feed a padded
      depthwise Conv and a residual Add);
    - ``linear_batchnorms``: after a ``Linear`` (exported as Gemm or MatMul), folded backwards;
    - ``forward_linear_batchnorms``: no producer to fold into, but the BN's output reaches one ``Linear`` alone,
      possibly through ``Dropout``/``Identity``, ``Flatten`` (or a Reshape that flattens) and global average
      pooling (``GlobalAveragePool``/``ReduceMean`` over the spatial axes): folded forward into that Gemm/MatMul;
    - ``token_linear_batchnorms``: LeViT's Linear+BN, ``MatMul`` on ``[B, N, C]`` tokens → ``Flatten``/
      ``Reshape`` to ``[B·N, C]`` → BN → ``Reshape`` back: folded backwards through the flatten into the
      MatMul's weight columns;
    - ``concat_batchnorms``: after a ``Concat`` (along channels) of Convs each read only by that Concat
      (MixNet's mixed kernels): split per input channel range and folded into each Conv.

    Every other BN follows a Conv or ConvTranspose and is folded backwards.
    """

    name: str
    family: str
    factory: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    seed: int
    producers: str
    note: str
    input_name: str = "input"
    output_name: str = "output"
    unfoldable_batchnorms: int = 0
    linear_batchnorms: int = 0
    forward_linear_batchnorms: int = 0
    token_linear_batchnorms: int = 0
    concat_batchnorms: int = 0


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("resnet_basic", "resnet", resnet_basic, (3, 32, 32), 101, "Conv", "basic blocks, projection shortcuts"),
    ZooEntry(
        "resnet_bottleneck", "resnet", resnet_bottleneck, (3, 32, 32), 102, "Conv", "bottleneck blocks (1x1-3x3-1x1)"
    ),
    ZooEntry("resnext", "resnext", resnext, (3, 32, 32), 103, "Conv", "grouped 3x3 conv (cardinality 4)"),
    ZooEntry(
        "mobilenet_v2", "mobilenet", mobilenet_v2, (3, 32, 32), 104, "Conv", "depthwise conv, ReLU6, linear bottlenecks"
    ),
    ZooEntry(
        "mobilenet_v3",
        "mobilenet",
        mobilenet_v3,
        (3, 32, 32),
        105,
        "Conv",
        "depthwise 5x5, hardswish, squeeze-excitation",
    ),
    ZooEntry(
        "efficientnet_b0", "efficientnet", efficientnet_b0, (3, 32, 32), 106, "Conv", "MBConv, SiLU, squeeze-excitation"
    ),
    ZooEntry(
        "densenet",
        "densenet",
        densenet,
        (3, 32, 32),
        107,
        "Conv, Concat, pooling",
        "pre-activation BN after Concat/pooling (not foldable into a producer)",
        unfoldable_batchnorms=8,
    ),
    ZooEntry(
        "shufflenet_v2", "shufflenet", shufflenet_v2, (3, 32, 32), 108, "Conv", "channel split/shuffle, depthwise conv"
    ),
    ZooEntry(
        "unet", "unet", unet, (3, 32, 32), 109, "Conv, ConvTranspose", "ConvTranspose+BN (one grouped), convs with bias"
    ),
    ZooEntry(
        "audio_cnn", "audio1d", audio_cnn, (40, 98), 110, "Conv (1-D)", "Conv1d+BatchNorm1d, dilated and depthwise"
    ),
    ZooEntry(
        "video_cnn", "video3d", video_cnn, (3, 8, 16, 16), 111, "Conv (3-D)", "Conv3d+BatchNorm3d, (2+1)D, grouped"
    ),
    ZooEntry(
        "mlp",
        "mlp",
        mlp,
        (64,),
        112,
        "Gemm / MatMul",
        "Linear+BatchNorm1d, one Linear without bias",
        linear_batchnorms=2,
    ),
    ZooEntry(
        "levit",
        "levit",
        levit,
        (3, 32, 32),
        113,
        "Conv, MatMul (3-D) → Flatten/Reshape, ReduceMean",
        "LeViT Linear+BN on tokens (bn(linear(x).flatten(0, 1)).reshape_as(x)), tiny attention, BN1d+Linear head",
        forward_linear_batchnorms=1,
        token_linear_batchnorms=8,
    ),
    ZooEntry(
        "mixnet",
        "mixnet",
        mixnet,
        (3, 32, 32),
        114,
        "Conv, Concat of Convs",
        "mixed-kernel depthwise 3/5/7 and split 1x1 convs: Split → Convs → Concat → BN, SE",
        concat_batchnorms=4,
    ),
    ZooEntry(
        "face_head",
        "face",
        face_head,
        (3, 32, 32),
        115,
        "Conv, Gemm; forward into Gemm",
        "iResNet face embedding: BN2d → Dropout → Flatten → Linear → BN1d; MLP Linear → ReLU → BN1d → Linear",
        linear_batchnorms=1,
        forward_linear_batchnorms=2,
    ),
    ZooEntry(
        "convmixer",
        "convmixer",
        convmixer,
        (3, 32, 32),
        116,
        "GELU; forward through pooling into Gemm",
        "Conv → GELU → BN everywhere: residual BNs stay, the last folds through AvgPool → Flatten into the head",
        unfoldable_batchnorms=4,
        forward_linear_batchnorms=1,
    ),
    ZooEntry(
        "demo_resnet", "resnet", demo_resnet, (3, 32, 32), 2024, "Conv", "the README demo network", output_name="logits"
    ),
)


def zoo_entry(name: str) -> ZooEntry:
    """The entry called ``name``; ``KeyError`` listing the known names otherwise."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(entry.name for entry in ZOO)}")
