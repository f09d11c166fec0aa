"""Small Conv+BatchNormalization chains for the performance-path tests (weights random, BN state realistic).

Each layer is ``Conv(k×k, C→C, no bias) → BatchNormalization`` with γ ~ U(0.5, 1.5), β, mean ~ N(0, 0.2) and
var ~ U(0.5, 2), so folding changes every weight. Weights can be stored inline or as external data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def conv_bn_chain(
    path: str | os.PathLike,
    *,
    layers: int,
    channels: int,
    kernel: int = 3,
    external: bool = False,
    extra_untouched: bool = False,
    seed: int = 0,
) -> Path:
    """Write the chain to ``path`` (``<name>.data`` beside it when ``external``) and return ``path``.

    ``extra_untouched`` appends a Conv without BN whose weight the fold must leave byte-identical.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    data = open(path.parent / data_name, "wb") if external else None  # noqa: SIM115 - closed below
    nodes, initializers = [], []

    def add_tensor(name: str, array: np.ndarray) -> None:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        if data is not None and array.nbytes >= 1024:
            offset = data.tell()
            data.write(array.tobytes())
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        else:
            tensor.raw_data = array.tobytes()
        initializers.append(tensor)

    x = "input"
    shape = (channels, channels, kernel, kernel)
    for i in range(layers):
        add_tensor(f"w{i}", (rng.standard_normal(shape) * 0.1).astype(np.float32))
        for name, values in (
            ("gamma", rng.uniform(0.5, 1.5, channels)),
            ("beta", rng.normal(0, 0.2, channels)),
            ("mean", rng.normal(0, 0.2, channels)),
            ("var", rng.uniform(0.5, 2.0, channels)),
        ):
            add_tensor(f"{name}{i}", values.astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"conv{i}"], name=f"conv{i}", pads=[kernel // 2] * 4))
        bn_inputs = [f"conv{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"]
        nodes.append(helper.make_node("BatchNormalization", bn_inputs, [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    if extra_untouched:
        add_tensor("w_plain", (rng.standard_normal(shape) * 0.1).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, "w_plain"], ["plain"], name="plain", pads=[kernel // 2] * 4))
        x = "plain"
    if data is not None:
        data.close()
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 4, 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    return onnx.load(os.fspath(path), load_external_data=False)
