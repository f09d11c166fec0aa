"""Small Conv+BatchNormalization models for the validation tests, built with ``onnx.helper``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

import bnfold

OPSET = 17


def conv_bn_chain(
    blocks: int = 2,
    *,
    channels: int = 4,
    batch: int | str = "batch",
    spatial: int | str = 8,
    seed: int = 0,
    second_output: bool = False,
) -> onnx.ModelProto:
    """``x → (Conv_i → BatchNormalization bn_i → Relu) × blocks → y`` with non-trivial BN statistics.

    BN ``i`` is named ``bn{i}`` and outputs ``bn{i}_out``; Conv ``i`` reads weight ``w{i}``. With
    ``second_output`` the graph also outputs ``z = ReduceMean(y)`` (keepdims=0).
    """
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    previous, in_channels = "x", 3
    for index in range(blocks):
        weight = rng.standard_normal((channels, in_channels, 3, 3)).astype(np.float32) * 0.3
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"b{index}"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), f"gamma{index}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"beta{index}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"mean{index}"),
            numpy_helper.from_array(rng.uniform(0.2, 3.0, channels).astype(np.float32), f"var{index}"),
        ]
        nodes += [
            helper.make_node(
                "Conv", [previous, f"w{index}", f"b{index}"], [f"conv{index}_out"], name=f"conv{index}", pads=[1] * 4
            ),
            helper.make_node(
                "BatchNormalization",
                [f"conv{index}_out", f"gamma{index}", f"beta{index}", f"mean{index}", f"var{index}"],
                [f"bn{index}_out"],
                name=f"bn{index}",
            ),
            helper.make_node("Relu", [f"bn{index}_out"], [f"relu{index}_out"], name=f"relu{index}"),
        ]
        previous, in_channels = f"relu{index}_out", channels
    nodes.append(helper.make_node("Identity", [previous], ["y"], name="output"))
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, channels, spatial, spatial])]
    if second_output:
        nodes.append(helper.make_node("ReduceMean", ["y"], ["z"], name="mean_out", keepdims=0, axes=[1, 2, 3]))
        outputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(
        nodes,
        "conv_bn_chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, spatial, spatial])],
        outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` (from :func:`conv_bn_chain`) with every BN folded by hand in float64, and the probes
    ``{BN output tensor: BN node name}``. Independent of bnfold's fold engine on purpose."""
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    nodes, initializers, probes = [], dict(arrays), {}
    by_output = {node.output[0]: node for node in model.graph.node}
    batch_norm_inputs = {node.input[0] for node in model.graph.node if node.op_type == "BatchNormalization"}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            if node.output[0] not in batch_norm_inputs:
                nodes.append(node)
            continue
        conv = by_output[node.input[0]]
        gamma, beta, mean, var = (arrays[name].astype(np.float64) for name in node.input[1:])
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + epsilon)
        weight, bias = conv.input[1], conv.input[2]
        initializers[weight] = (arrays[weight].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
        initializers[bias] = ((arrays[bias] - mean) * scale + beta).astype(np.float32)
        for name in node.input[1:]:
            del initializers[name]
        folded_conv = onnx.NodeProto()
        folded_conv.CopyFrom(conv)
        folded_conv.output[0] = node.output[0]
        nodes.append(folded_conv)
        probes[node.output[0]] = node.name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in initializers.items())
    return copy, probes


def folded_by_bnfold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model folded by bnfold, and the probes of every fold (as the ``fold`` command passes them)."""
    folded_model, report = bnfold.fold(model)
    return ir.to_proto(folded_model), {record.output: record.node for record in report.folded}


def perturbed(model: onnx.ModelProto, initializer: str, relative: float = 1e-2) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``initializer`` is scaled by ``1 + relative`` (first element)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, tensor in enumerate(copy.graph.initializer):
        if tensor.name == initializer:
            array = numpy_helper.to_array(tensor).copy()
            array.flat[0] *= 1 + relative
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, initializer))
            return copy
    raise KeyError(initializer)


def single_op_model(
    op_type: str,
    elem_type: int,
    shape: list,
    *,
    output_elem_type: int | None = None,
    inputs: tuple[str, ...] = ("x",),
    **attributes,
) -> onnx.ModelProto:
    """``y = op_type(inputs...)``: every input of ``elem_type`` and ``shape``."""
    graph = helper.make_graph(
        [helper.make_node(op_type, list(inputs), ["y"], name=op_type.lower(), **attributes)],
        f"{op_type.lower()}_model",
        [helper.make_tensor_value_info(name, elem_type, shape) for name in inputs],
        [helper.make_tensor_value_info("y", output_elem_type or elem_type, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
