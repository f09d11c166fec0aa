"""Graph I/O: load models into onnx_ir (external data stays lazy), check external-data safety, save atomically.

Loading never modifies the input. Saving writes every file to a temporary name in the destination's directory
and renames it into place, so a reader never sees a half-written model and a crash leaves the previous state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from bnfold.errors import InvalidModelError, UsageError

# Models above this size cannot be serialised as one protobuf (2 GiB limit), so they go to external data.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3
# Tensors smaller than this stay inside the .onnx file when external data is written.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load the model at ``path``; external tensors stay on disk and are memory-mapped when read.

    Raises:
        InvalidModelError: the path is missing or not a file, the bytes are not an ONNX model, or an
            external-data reference is unsafe or broken (see :func:`check_external_data`).
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: empty file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as error:
        raise InvalidModelError(f"{path}: not a valid ONNX model ({_one_line(error)})") from error
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{path}: not an ONNX model (the protobuf has no graph)")
    check_external_data(proto, path.parent, source=path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:
        raise InvalidModelError(f"{path}: invalid ONNX model ({_one_line(error)})") from error
    ir.external_data.set_base_dir(model.graph, os.fspath(path.parent))
    return model


def as_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Accept a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and return an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as is (callers that must not change it copy it first).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        check_external_data(model, None, source="<ModelProto>")
        try:
            return ir.serde.deserialize_model(model)
        except Exception as error:
            raise InvalidModelError(f"invalid ONNX model ({_one_line(error)})") from error
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _iter_tensor_protos(proto: onnx.ModelProto):
    def from_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from from_graph(attribute.g)
                for subgraph in attribute.graphs:
                    yield from from_graph(subgraph)

    yield from from_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t


def check_external_data(proto: onnx.ModelProto, base_dir: Path | None, *, source: object) -> None:
    """Refuse external-data references that escape the model's directory or point past the data file.

    A location must be relative, contain no ``..`` component, and resolve (symlinks included) inside
    ``base_dir``; the referenced file must exist and hold ``offset + length`` bytes.
    """
    resolved_base = base_dir.resolve() if base_dir is not None else None
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        where = f"{source}: tensor {tensor.name!r}"
        if not location:
            raise InvalidModelError(f"{where}: external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise InvalidModelError(f"{where}: absolute external-data location {location!r} refused")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise InvalidModelError(f"{where}: external-data location {location!r} contains '..'")
        if resolved_base is None:
            raise InvalidModelError(f"{where}: external data needs the model's file path to resolve")
        target = (resolved_base / location).resolve()
        if resolved_base != target and resolved_base not in target.parents:
            raise InvalidModelError(f"{where}: external-data location {location!r} resolves outside {base_dir}")
        if not target.is_file():
            raise InvalidModelError(f"{where}: external-data file {location!r} not found")
        try:
            offset = int(entries.get("offset", 0) or 0)
            length = int(entries["length"]) if entries.get("length") else None
        except ValueError as error:
            raise InvalidModelError(f"{where}: malformed external-data offset/length") from error
        size = target.stat().st_size
        if offset < 0 or (length is not None and length < 0):
            raise InvalidModelError(f"{where}: negative external-data offset/length")
        end = offset + (length or 0)
        if offset > size or end > size:
            raise InvalidModelError(
                f"{where}: external data {location!r} is truncated (needs {end} bytes, file has {size})"
            )


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of any graph is stored in an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.graphs()
        for value in graph.initializers.values()
    )


def estimated_size_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, a lower bound of the serialised size."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def external_data_name(path: str | os.PathLike) -> str:
    """The external data file name bnfold writes beside ``path``: ``<file name>.data``."""
    return Path(path).name + ".data"


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    with stage_model(model, path, external_data=external_data) as staged:
        staged.commit()


def stage_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """Write ``model`` under a temporary directory beside ``path``; :meth:`StagedModel.commit` moves it in.

    ``external_data=None`` chooses: external data when the model already had external tensors or its
    tensors exceed the 2 GiB protobuf limit. The data file is ``<file name>.data`` beside ``path``. The
    staged files can be used (verified, for instance) before they replace anything at ``path``.
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or estimated_size_bytes(model) >= PROTOBUF_LIMIT_BYTES
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory)
    staged = StagedModel(staging, path, external_data_name(path) if external_data else None)
    try:
        if external_data:
            ir.save(
                model,
                staged.path,
                external_data=staged.data_name,
                size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES,
            )
        else:
            ir.save(model, staged.path)
    except BaseException:
        staged.discard()
        raise
    return staged


class StagedModel:
    """A model written under a temporary directory, not yet visible at its destination.

    Use as a context manager: leaving the block without :meth:`commit` removes the staged files.
    """

    def __init__(self, staging: tempfile.TemporaryDirectory, destination: Path, data_name: str | None) -> None:
        self._staging = staging
        self.destination = destination
        self.data_name = data_name
        self.path = Path(staging.name) / destination.name

    def commit(self) -> None:
        """fsync, then rename the data file (if any) and the model into place; the model goes last."""
        directory = self.destination.parent
        if self.data_name is not None:
            staged_data = self.path.parent / self.data_name
            _fsync(staged_data)
            os.replace(staged_data, directory / self.data_name)
        _fsync(self.path)
        os.replace(self.path, self.destination)
        _fsync_directory(directory)
        self.discard()

    def discard(self) -> None:
        self._staging.cleanup()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def files_size_bytes(path: str | os.PathLike, model: ir.Model | None = None) -> int:
    """Bytes of the model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    locations: set[str] = set()
    if model is not None:
        for graph in model.graphs():
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    locations.add(value.const_value.location)
    else:
        data = path.parent / external_data_name(path)
        if data.is_file():
            locations.add(data.name)
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def _fsync(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
