"""Valid seed models for the fuzzer and the security tests, built with ``onnx.helper``.

A :class:`Case` is a model file's bytes plus the side files (external data) that live beside it, so that a
case can be written into any empty directory and loaded from there. Every seed passes
``onnx.checker.check_model``; mutations start from these.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 17


@dataclasses.dataclass(frozen=True)
class Case:
    """A model file (``model_bytes``) plus side files by relative name; ``links`` maps a name to a symlink target."""

    model_bytes: bytes
    files: tuple[tuple[str, bytes], ...] = ()
    links: tuple[tuple[str, str], ...] = ()

    def write(self, directory: Path) -> Path:
        """Write the model as ``directory/model.onnx`` with its side files; return the model path."""
        for name, data in self.files:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for name, link_target in self.links:
            link = directory / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link_target, link)
        path = directory / MODEL_FILE
        path.write_bytes(self.model_bytes)
        return path


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name=name)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bn_params(prefix: str, channels: int, dtype: type, rng: np.random.Generator) -> list[TensorProto]:
    return [
        _tensor(f"{prefix}_gamma", rng.uniform(0.5, 1.5, channels).astype(dtype)),
        _tensor(f"{prefix}_beta", rng.standard_normal(channels).astype(dtype)),
        _tensor(f"{prefix}_mean", rng.standard_normal(channels).astype(dtype)),
        _tensor(f"{prefix}_var", rng.uniform(0.2, 2.0, channels).astype(dtype)),
    ]


def _bn_node(prefix: str, x: str, y: str, **attributes: object) -> onnx.NodeProto:
    inputs = [x, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attributes)


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    opset: int = OPSET,
    ir_version: int = 8,
    extra_opsets: tuple[tuple[str, int], ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "seed", inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="bnfold-fuzz-seed")
    model.ir_version = ir_version
    return model


def _value(name: str, shape: list[int | str | None], elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def conv_bn(
    dtype: type = np.float32,
    *,
    bias: bool = True,
    group: int = 1,
    rank: int = 2,
    seed: int = 0,
    channels: tuple[int, int] = (4, 6),
) -> onnx.ModelProto:
    """``X → Conv(W[, B]) → BN → Y`` with ``channels`` = (input, output) channels (default 4 → 6)."""
    rng = _rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kernel = (3,) * rank
    c_in, c_out = channels
    weight = (rng.standard_normal((c_out, c_in // group, *kernel)) * 0.5).astype(dtype)
    initializers = [_tensor("W", weight), *_bn_params("bn", c_out, dtype, rng)]
    conv_inputs = ["X", "W"]
    if bias:
        initializers.append(_tensor("B", rng.standard_normal(c_out).astype(dtype)))
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", group=group, pads=[1] * (2 * rank)),
        _bn_node("bn", "conv_out", "Y"),
    ]
    spatial = [5] * rank
    inputs = [_value("X", [1, c_in, *spatial], elem)]
    return _model(nodes, initializers, inputs, [_value("Y", [1, c_out, *spatial], elem)])


def conv_transpose_bn(group: int = 2, seed: int = 1) -> onnx.ModelProto:
    """``X → ConvTranspose(W, B, group) → BN → Y`` (4 → 6 channels, stride 2)."""
    rng = _rng(seed)
    weight = (rng.standard_normal((4, 6 // group, 3, 3)) * 0.5).astype(np.float32)
    initializers = [_tensor("W", weight), _tensor("B", rng.standard_normal(6).astype(np.float32))]
    initializers += _bn_params("bn", 6, np.float32, rng)
    nodes = [
        helper.make_node("ConvTranspose", ["X", "W", "B"], ["ct_out"], name="ct", group=group, strides=[2, 2]),
        _bn_node("bn", "ct_out", "Y"),
    ]
    return _model(nodes, initializers, [_value("X", [1, 4, 4, 4])], [_value("Y", [1, 6, 9, 9])])


def chain(seed: int = 2) -> onnx.ModelProto:
    """Two Conv+BN blocks with a Relu between, a shared producer and a Constant-fed BN: skips and folds mixed."""
    rng = _rng(seed)
    initializers = [
        _tensor("W1", (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)),
        _tensor("W2", (rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32)),
        *_bn_params("bn1", 4, np.float32, rng),
        *_bn_params("bn2", 4, np.float32, rng),
    ]
    constant_values = {"gamma": np.ones(4), "beta": np.zeros(4), "mean": np.zeros(4), "var": np.ones(4)}
    constant_params = [
        helper.make_node("Constant", [], [f"bn3_{p}"], name=f"const_{p}", value=_tensor(f"c_{p}", v.astype(np.float32)))
        for p, v in constant_values.items()
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn_node("bn1", "c1", "b1", epsilon=1e-3),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="dw", group=4, pads=[1, 1, 1, 1]),
        _bn_node("bn2", "c2", "b2"),
        helper.make_node("Identity", ["c2"], ["side"], name="side_reader"),
        *constant_params,
        _bn_node("bn3", "b2", "Y"),
    ]
    return _model(
        nodes,
        initializers,
        [_value("X", [1, 3, 6, 6])],
        [_value("Y", [1, 4, 6, 6]), _value("side", [1, 4, 6, 6])],
    )


def legacy_opset6(seed: int = 3) -> onnx.ModelProto:
    """Opset 6, IR 3: initializers also listed as graph inputs, BN with ``is_test=1``."""
    rng = _rng(seed)
    initializers = [
        _tensor("W", (rng.standard_normal((3, 2, 1, 1))).astype(np.float32)),
        *_bn_params("bn", 3, np.float32, rng),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        _bn_node("bn", "c", "Y", is_test=1, spatial=1),
    ]
    inputs = [_value("X", [1, 2, 4, 4])] + [_value(t.name, list(t.dims)) for t in initializers]
    return _model(nodes, initializers, inputs, [_value("Y", [1, 3, 4, 4])], opset=6, ir_version=3)


def subgraph_and_custom(seed: int = 4) -> onnx.ModelProto:
    """A Conv+BN inside an ``If`` branch, and a BN after an op of an unknown domain."""
    rng = _rng(seed)
    branch_initializers = [
        _tensor("Wb", (rng.standard_normal((2, 2, 1, 1))).astype(np.float32)),
        *_bn_params("bnb", 2, np.float32, rng),
    ]
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "Wb"], ["cb"], name="conv_b"), _bn_node("bnb", "cb", "yb")],
        "then",
        [],
        [_value("yb", [1, 2, 3, 3])],
        initializer=branch_initializers,
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["ye"], name="id_e")], "else", [], [_value("ye", [1, 2, 3, 3])]
    )
    initializers = _bn_params("bnc", 2, np.float32, rng)
    nodes = [
        helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Mystery", ["branch"], ["m"], name="mystery", domain="com.example"),
        _bn_node("bnc", "m", "Y"),
    ]
    inputs = [_value("cond", [], TensorProto.BOOL), _value("X", [1, 2, 3, 3])]
    return _model(nodes, initializers, inputs, [_value("Y", [1, 2, 3, 3])], extra_opsets=(("com.example", 1),))


def gemm_matmul_bn(seed: int = 5) -> onnx.ModelProto:
    """``Gemm → BN`` and ``MatMul → BN`` on [N, C] activations (folded once those rules exist)."""
    rng = _rng(seed)
    initializers = [
        _tensor("Wg", rng.standard_normal((5, 4)).astype(np.float32)),
        _tensor("Bg", rng.standard_normal(5).astype(np.float32)),
        _tensor("Wm", rng.standard_normal((5, 3)).astype(np.float32)),
        *_bn_params("bng", 5, np.float32, rng),
        *_bn_params("bnm", 3, np.float32, rng),
    ]
    nodes = [
        helper.make_node("Gemm", ["X", "Wg", "Bg"], ["g"], name="gemm", transB=1),
        _bn_node("bng", "g", "h"),
        helper.make_node("MatMul", ["h", "Wm"], ["mm"], name="matmul"),
        _bn_node("bnm", "mm", "Y"),
    ]
    return _model(nodes, initializers, [_value("X", [2, 4])], [_value("Y", [2, 3])])


def forward_and_add(seed: int = 10) -> onnx.ModelProto:
    """``X → BN → Conv`` (forward fold) and ``Conv → Add(c[C,1,1]) → BN`` (fold through the Add)."""
    rng = _rng(seed)
    initializers = [
        *_bn_params("bnf", 3, np.float32, rng),
        _tensor("Wf", (rng.standard_normal((4, 3, 1, 1)) * 0.5).astype(np.float32)),
        _tensor("Wa", (rng.standard_normal((4, 4, 3, 3)) * 0.5).astype(np.float32)),
        _tensor("c", rng.standard_normal((4, 1, 1)).astype(np.float32)),
        *_bn_params("bna", 4, np.float32, rng),
    ]
    nodes = [
        _bn_node("bnf", "X", "xn"),
        helper.make_node("Conv", ["xn", "Wf"], ["f"], name="conv_forward"),
        helper.make_node("Conv", ["f", "Wa"], ["a"], name="conv_add", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "c"], ["ac"], name="add_c"),
        _bn_node("bna", "ac", "Y"),
    ]
    return _model(nodes, initializers, [_value("X", [1, 3, 5, 5])], [_value("Y", [1, 4, 5, 5])])


def function_body(seed: int = 11) -> onnx.ModelProto:
    """A model-local function ``local::ConvBN`` holding ``Conv → BN``, called once from the main graph."""
    rng = _rng(seed)
    initializers = [
        _tensor("W", (rng.standard_normal((3, 2, 3, 3)) * 0.5).astype(np.float32)),
        *_bn_params("bn", 3, np.float32, rng),
    ]
    body = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="f_conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="f_bn"),
    ]
    function = helper.make_function(
        "local", "ConvBN", ["x", "w", "g", "b", "m", "v"], ["y"], body, [helper.make_opsetid("", OPSET)]
    )
    call = helper.make_node(
        "ConvBN", ["X", "W", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["Y"], name="call", domain="local"
    )
    model = _model(
        [call], initializers, [_value("X", [1, 2, 4, 4])], [_value("Y", [1, 3, 4, 4])], extra_opsets=(("local", 1),)
    )
    model.functions.append(function)
    return model


def training_mode(seed: int = 12) -> onnx.ModelProto:
    """Opset-15 ``Conv → BN(training_mode=1)`` with running-statistics outputs (for ``lower-training``)."""
    rng = _rng(seed)
    initializers = [
        _tensor("W", (rng.standard_normal((3, 2, 1, 1))).astype(np.float32)),
        *_bn_params("bn", 3, np.float32, rng),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
            ["Y", "running_mean", "running_var"],
            name="bn",
            training_mode=1,
            momentum=0.9,
        ),
    ]
    outputs = [_value("Y", [2, 3, 4, 4]), _value("running_mean", [3]), _value("running_var", [3])]
    return _model(nodes, initializers, [_value("X", [2, 2, 4, 4])], outputs, opset=15)


def external_data_case(seed: int = 6) -> Case:
    """``conv_bn`` with every initializer of 16+ bytes in ``model.onnx.data`` beside the model."""
    model = conv_bn(seed=seed)
    data = bytearray()
    for tensor in model.graph.initializer:
        raw = numpy_helper.to_array(tensor).tobytes()
        if len(raw) < 16:
            continue
        offset = len(data)
        data += raw
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return Case(model.SerializeToString(), ((DATA_FILE, bytes(data)),))


SEED_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn": conv_bn,
    "conv_bn_fp16_nobias": lambda: conv_bn(np.float16, bias=False, seed=7),
    "conv_bn_fp64_grouped_1d": lambda: conv_bn(np.float64, group=2, rank=1, seed=8),
    "conv_bn_3d": lambda: conv_bn(rank=3, seed=9),
    "conv_transpose_bn": conv_transpose_bn,
    "chain": chain,
    "legacy_opset6": legacy_opset6,
    "subgraph_and_custom": subgraph_and_custom,
    "gemm_matmul_bn": gemm_matmul_bn,
    "forward_and_add": forward_and_add,
    "function_body": function_body,
    "training_mode": training_mode,
}


def seed_cases() -> dict[str, Case]:
    """Every built-in seed as a :class:`Case` (external-data variant included), by name."""
    cases = {name: Case(build().SerializeToString()) for name, build in SEED_BUILDERS.items()}
    cases["external_data"] = external_data_case()
    return cases
