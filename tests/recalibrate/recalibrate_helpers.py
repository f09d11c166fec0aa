"""Shared pieces of the recalibration tests: zoo models exported from torch, BN statistics by module name."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import torch

from models.build import CALIBRATION_BATCH, prepared_model
from models.common import batchnorm_modules, calibration_batch, single_threaded
from models.export import Exporter, export_model
from models.zoo import zoo_entry


def torch_module(name: str) -> torch.nn.Module:
    """A private copy of zoo model ``name`` (calibrated, eval mode)."""
    return copy.deepcopy(prepared_model(name))


def export(module: torch.nn.Module, name: str, *, opset: int = 17) -> ir.Model:
    """``module`` exported with TorchScript at ``opset`` (input ``input``; BN kept)."""
    entry = zoo_entry(name)
    sample = torch.zeros((2, *entry.sample_shape))
    with single_threaded():
        return export_model(
            module.eval(),
            (sample,),
            exporter=Exporter.TORCHSCRIPT,
            opset=opset,
            input_names=("input",),
            output_names=("output",),
        )


def module_name(node_name: str) -> str:
    """TorchScript scope ``/stages/stages.0/stages.0.0/branch1/branch1.1/BatchNormalization`` → the module path
    ``stages.0.0.branch1.1`` (a scope component repeats its parent's component as a prefix inside containers)."""
    components = node_name.strip("/").split("/")[:-1]
    path, previous = "", None
    for component in components:
        if previous is not None and component.startswith(previous + "."):
            path += "." + component[len(previous) + 1 :]
        else:
            path = f"{path}.{component}" if path else component
        previous = component
    return path


def onnx_statistics(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{torch module name: (mean, var)}`` of every BatchNormalization in the main graph."""
    result = {}
    for node in model.graph:
        if node.op_type == "BatchNormalization":
            mean, var = (node.inputs[index].const_value.numpy() for index in (3, 4))
            result[module_name(node.name)] = (mean, var)
    return result


def torch_statistics(module: torch.nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module name: (running_mean, running_var)}`` of every BatchNorm of ``module``."""
    norms = set(batchnorm_modules(module))
    return {
        name: (sub.running_mean.numpy().copy(), sub.running_var.numpy().copy())
        for name, sub in module.named_modules()
        if sub in norms
    }


def set_garbage_statistics(model: ir.Model, seed: int = 0) -> None:
    """Replace every BN's mean/var by new garbage tensors (mean ~ N(0, 100²), var ~ U(50, 500))."""
    rng = np.random.default_rng(seed)
    for node in model.graph:
        if node.op_type == "BatchNormalization":
            mean, var = node.inputs[3], node.inputs[4]
            shape = mean.const_value.shape
            mean.const_value = ir.Tensor((rng.standard_normal(shape.numpy()) * 100).astype(np.float32), name=mean.name)
            var.const_value = ir.Tensor(rng.uniform(50, 500, shape.numpy()).astype(np.float32), name=var.name)


def zoo_calibration_batches(name: str) -> list[np.ndarray]:
    """The exact batches ``models.common.calibrate_batchnorm`` measured zoo model ``name``'s statistics on.

    Replays its generator: γ and β draws per BN first, then four ``calibration_batch`` calls.
    """
    entry = zoo_entry(name)
    generator = torch.Generator().manual_seed(entry.seed)
    for norm in batchnorm_modules(prepared_model(name)):
        if norm.affine:
            torch.rand(norm.weight.shape, generator=generator)
            torch.randn(norm.bias.shape, generator=generator)
    shape = (CALIBRATION_BATCH, *entry.sample_shape)
    return [calibration_batch(shape, generator).numpy() for _ in range(4)]


def draw(shape: tuple[int, ...], seed: int, *, scale: float = 1.5, offset: float = 0.7) -> np.ndarray:
    """A float32 batch from the fixed distribution ``N(offset, scale²)``."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float32)
