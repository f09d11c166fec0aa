"""Models as onnxruntime will see them: the protobuf (external data left on disk) and where that data lives.

The verifier accepts a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. Large tensors never need to be
read into Python: a path is loaded without its external data (``bnfold.files.checks`` checks that every external
reference stays inside the model's directory), and onnxruntime reads the data from the recorded directory
(session config ``session.model_external_initializers_file_folder_path``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, UsageError
from bnfold.files.checks import check_external_data, check_model_proto, iter_tensor_protos
from bnfold.files.load import ModelInput, read_model_proto


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model ready for onnxruntime.

    Attributes:
        label: how reports name the model (its path, or ``<onnx.ModelProto>`` / ``<onnx_ir.Model>``).
        proto: the model; external tensors stay references.
        external_data_dir: the directory external references are relative to (``None`` when there are none).
    """

    label: str
    proto: onnx.ModelProto
    external_data_dir: Path | None

    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.proto.graph.output)

    def node_outputs(self) -> dict[str, int]:
        """Tensor name → index of the main-graph node producing it (graph order is topological)."""
        return {name: index for index, node in enumerate(self.proto.graph.node) for name in node.output if name}

    def with_extra_outputs(self, names: tuple[str, ...]) -> ModelSource:
        """A copy whose graph also outputs ``names`` (intermediate tensors), so a session returns them.

        The extra outputs carry no type: onnxruntime takes the type of the producing node.
        """
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        existing = set(self.output_names())
        for name in names:
            if name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        return dataclasses.replace(self, proto=proto)


def load_model_source(model: ModelInput) -> ModelSource:
    """Turn any accepted model into a :class:`ModelSource`; raises :class:`InvalidModelError` when unreadable."""
    if isinstance(model, (str, os.PathLike)):
        return _from_path(Path(model))
    if isinstance(model, onnx.ModelProto):
        check_model_proto(model, source="<onnx.ModelProto>")
        check_external_data(model, None, source="<onnx.ModelProto>")
        return ModelSource("<onnx.ModelProto>", model, None)
    if isinstance(model, ir.Model):
        return _from_ir_model(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _from_path(path: Path) -> ModelSource:
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a regular file")
    try:
        proto = read_model_proto(path)  # read from the descriptor checked to be a regular file (no FIFO race)
    except InvalidModelError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidModelError(f"{path}: not a valid ONNX model ({first_line})") from error
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{path}: not an ONNX model (the protobuf has no graph)")
    check_model_proto(proto, source=path)  # the same checks as every other command: exit 3, never a crash
    check_external_data(proto, path.parent, source=path)
    return ModelSource(os.fspath(path), proto, path.parent if _has_external_data(proto) else None)


def _from_ir_model(model: ir.Model) -> ModelSource:
    label = f"<onnx_ir.Model {model.graph.name}>" if model.graph.name else "<onnx_ir.Model>"
    base_dirs = {
        Path(value.const_value.base_dir)
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    if len(base_dirs) > 1:  # references relative to different directories: read them into the copy
        return ModelSource(label, _without_external_references(model), None)
    try:
        proto = ir.serde.serialize_model(model)
    except Exception as error:
        raise InvalidModelError(f"{label}: cannot serialise the model ({error})") from error
    return ModelSource(label, proto, base_dirs.pop() if base_dirs else None)


def _without_external_references(model: ir.Model) -> onnx.ModelProto:
    """Serialise ``model`` with every external tensor read into memory (the model itself is not changed)."""
    proto = ir.serde.serialize_model(model)
    external = {
        value.name: value.const_value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    for tensor in iter_tensor_protos(proto):
        source = external.get(tensor.name)
        if source is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(ir.serde.serialize_tensor(ir.tensor(source.numpy(), name=tensor.name)))
    return proto


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in iter_tensor_protos(proto))
