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

from bnfold.errors import InvalidModelError, UsageError, one_line
from bnfold.model_checks import check_external_data, check_model_proto
from bnfold.passes.scopes import model_graphs

# Models above this size cannot be serialised as one protobuf (2 GiB limit), so they go to external data.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3
# Tensors smaller than this stay inside the .onnx file when external data is written.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
# ``ir.Model.meta`` key set by the loaders: frozenset of the resolved files the model was read from.
SOURCE_FILES_META = "bnfold.source_files"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load the model at ``path``; external tensors stay on disk and are memory-mapped when read.

    The model is checked before anything else looks at it (see :func:`~bnfold.model_checks.check_model_proto` and
    :func:`check_external_data`), so a malformed or hostile file ends here with one clear message.

    Raises:
        InvalidModelError: the path is missing or not a file, the bytes are not an ONNX model, the graph is
            malformed, or an external-data reference is unsafe or broken.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file")
        if not path.is_file():
            raise InvalidModelError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise InvalidModelError(f"{path}: empty file")
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except InvalidModelError:
        raise
    except OSError as error:  # permission denied, I/O error, name too long
        raise InvalidModelError(f"{path}: cannot read ({error.strerror or one_line(error)})") from error
    except Exception as error:  # protobuf's DecodeError for bytes that are not a model
        raise InvalidModelError(f"{path}: not a valid ONNX model ({one_line(error)})") from error
    check_model_proto(proto, source=path)
    check_external_data(proto, path.parent, source=path)
    model = _deserialize(proto, source=path)
    finish_loading(model, path.parent, source=path)
    return model


def as_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """Accept a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and return an ``onnx_ir.Model``.

    An ``ir.Model`` is returned as is (callers that must not change it copy it first). A ``ModelProto`` is
    checked like a file; its external data, if any, is refused (no directory to resolve it against).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        check_model_proto(model, source="<ModelProto>")
        check_external_data(model, None, source="<ModelProto>")
        loaded = _deserialize(model, source="<ModelProto>")
        finish_loading(loaded, None, source="<ModelProto>")
        return loaded
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def finish_loading(model: ir.Model, base_dir: Path | None, *, source: object) -> None:
    """Complete a model deserialised from a checked protobuf (every loader calls this last).

    - external tensors resolve against ``base_dir``, the model file's directory (``None``: no file);
    - external FLOAT6 initializers are read once, since their packing is validated only when decoded;
    - external tensors held by node attributes (Constant values) are read into memory: only initializers are
      written back as external data, so such a reference would point at a file the output lacks;
    - ``model.meta[SOURCE_FILES_META]`` records the resolved paths of the model file (``source`` when it is a
      path) and of every external-data file it reads, so that a writer can refuse to replace any of them even
      after folding dropped the last tensor that read a file (``model.clone()`` does not copy ``meta``);
    - the nodes are sorted topologically (stable: a sorted graph keeps its order). ONNX requires that order
      and :func:`check_model_proto` refused cycles, but out-of-order files exist and passes (``clone``,
      shape inference) assume the order.
    """
    graphs = model_graphs(model)
    # Base directories are set as ``ir.external_data.set_base_dir(model.graph, base)`` does, in these walks.
    base = os.fspath(base_dir) if base_dir is not None else None

    def in_order(graph: ir.Graph) -> bool:
        """Whether every node of ``graph`` (which has no subgraph) comes after the producers of its inputs."""
        seen: set[ir.Node] = set()
        for node in graph:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and producer not in seen:
                    return False
            seen.add(node)
        return True

    # The stable sort leaves an ordered graph as it is; it is skipped when that is plain without it (no
    # subgraph: then order and acyclicity only depend on this graph's own nodes).
    if len(graphs) > 1 or not in_order(model.graph):
        try:
            model.graph.sort()
        except Exception as error:  # a cycle check_model_proto did not see (through a subgraph)
            raise InvalidModelError(f"{source}: the graph cannot be ordered ({one_line(error)})") from error
    data_paths: set[str] = set()
    is_external: dict[type, bool] = {}  # per tensor class: isinstance on onnx_ir's protocol classes is slow
    for graph in graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            kind = type(tensor)
            if kind not in is_external:
                is_external[kind] = isinstance(tensor, ir.ExternalTensor)
            if is_external[kind]:
                if base is not None:
                    tensor.base_dir = base
                data_paths.add(tensor.path)
                if tensor.dtype.bitwidth == 6:
                    _in_memory(tensor, source)  # FLOAT6 data must have zero padding bits: validate now
    source_files = {Path(os.path.realpath(path)) for path in data_paths}
    if isinstance(source, (str, os.PathLike)):
        source_files.add(Path(os.path.realpath(source)))
    bodies: list[ir.Graph | ir.Function] = [*graphs, *model.functions.values()]
    for body in bodies:
        in_graph = base is not None and not isinstance(body, ir.Function)
        for node in body:
            if not node.attributes:
                continue
            for name, attribute in list(node.attributes.items()):
                if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                    if in_graph:
                        attribute.value.base_dir = base
                    node.attributes[name] = ir.AttrTensor(name, _in_memory(attribute.value, source))
                elif attribute.type == ir.AttributeType.TENSORS and any(
                    isinstance(tensor, ir.ExternalTensor) for tensor in attribute.value
                ):
                    for tensor in attribute.value if in_graph else ():
                        if isinstance(tensor, ir.ExternalTensor):
                            tensor.base_dir = base
                    tensors = [_in_memory(tensor, source) for tensor in attribute.value]
                    node.attributes[name] = ir.AttrTensors(name, tensors)
    model.meta[SOURCE_FILES_META] = frozenset(source_files)


def _in_memory(tensor: ir.TensorProtocol, source: object) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    try:
        return ir.Tensor(tensor.numpy().copy(), name=tensor.name)
    except Exception as error:
        message = f"{source}: tensor {tensor.name!r}: cannot read external data ({one_line(error)})"
        raise InvalidModelError(message) from error


def _deserialize(proto: onnx.ModelProto, *, source: object) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as error:
        raise InvalidModelError(f"{source}: invalid ONNX model ({one_line(error)})") from error


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of any graph is stored in an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model_graphs(model)
        for value in graph.initializers.values()
    )


def estimated_size_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, a lower bound of the serialised size."""
    return sum(
        value.const_value.nbytes
        for graph in model_graphs(model)
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
    tensors exceed the 2 GiB protobuf limit (file names: :func:`create_staging`). Tensors already on disk are
    copied byte for byte, never decoded; a self-contained model is streamed, never built as one protobuf
    (:mod:`bnfold.streaming`). The staged files can be used (verified, for instance) before they replace
    anything at ``path``. ``model`` is unchanged.
    """
    from bnfold.streaming import DataFile, write_model

    staged = create_staging(model, path, external_data=external_data)
    try:
        if staged.data_name is None:
            write_model(model, staged.path)
        else:
            data = DataFile(staged.data_path)
            try:
                write_model(model, staged.path, data)
            finally:
                data.close()
    except BaseException:
        staged.discard()
        raise
    return staged


def create_staging(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    read_files: set[Path] | None = None,
) -> StagedModel:
    """An empty temporary directory beside ``path`` and the names ``model`` is to be written under there.

    The data file is ``<file name>.data``, or ``<file name>.<n>.data`` with the smallest ``n >= 1`` when that
    name is a file ``model`` still reads external data from (folding in place alternates between the two), so
    the output never replaces a data file the input reads. ``read_files``: those files (resolved paths), when
    the caller knows them (default: :func:`external_files`).
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or estimated_size_bytes(model) >= PROTOBUF_LIMIT_BYTES
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    read = external_files(model) if read_files is None else read_files
    data_name = superseded = None
    if external_data:
        data_name = _data_name_not_in(path, read)
        superseded = tuple(
            file for file in read if file.parent == path.parent.resolve() and _is_data_name_for(path, file.name)
        )
    staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory)
    return StagedModel(staging, path, data_name, superseded=superseded or ())


def external_files(model: ir.Model) -> set[Path]:
    """Files ``model`` reads external data from, plus every file it was loaded from (even when folding dropped
    the last tensor that read one, an in-place save must not write into it before the model is renamed)."""
    loaded_from = {Path(file) for file in model.meta.get(SOURCE_FILES_META, ())}
    paths = {
        value.const_value.path
        for graph in model_graphs(model)
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    return loaded_from | {Path(os.path.realpath(path)) for path in paths}


def _is_data_name_for(path: Path, name: str) -> bool:
    if name == external_data_name(path):
        return True
    prefix, suffix = path.name + ".", ".data"
    middle = name[len(prefix) : -len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
    return middle.isdigit()


def _data_name_not_in(path: Path, taken: set[Path]) -> str:
    directory = path.parent.resolve()
    candidates = [external_data_name(path)] + [f"{path.name}.{n}.data" for n in range(1, len(taken) + 2)]
    return next(name for name in candidates if Path(os.path.realpath(directory / name)) not in taken)


class StagedModel:
    """A model written under a temporary directory, not yet visible at its destination.

    Use as a context manager: leaving the block without :meth:`commit` removes the staged files.
    ``superseded_data`` lists the data files, named for this destination, that the written model's source
    read and the new model no longer does (after an in-place fold: the previous data file).
    """

    def __init__(
        self,
        staging: tempfile.TemporaryDirectory,
        destination: Path,
        data_name: str | None,
        *,
        superseded: tuple[Path, ...] = (),
    ) -> None:
        self._staging = staging
        self.destination = destination
        self.data_name = data_name
        self.path = Path(staging.name) / destination.name
        self.superseded_data = tuple(file for file in superseded if file.name != data_name)

    @property
    def data_path(self) -> Path | None:
        """The staged data file (``None`` for a self-contained model)."""
        return self.path.parent / self.data_name if self.data_name is not None else None

    def size_bytes(self) -> int:
        """Bytes of the staged model and data file (before :meth:`commit`)."""
        data = self.data_path
        return self.path.stat().st_size + (data.stat().st_size if data is not None and data.is_file() else 0)

    def commit(self) -> None:
        """Rename the data file (if any), then the model into place; the model goes last.

        When the destination (or the data file name) already exists, the new files are fsynced first, so a
        crash cannot replace existing files by partly written ones. A new destination is renamed without
        fsync, like ``cp`` writes: the input stays intact whatever happens.
        """
        directory = self.destination.parent
        replacing = self.destination.exists() or (self.data_name is not None and (directory / self.data_name).exists())
        if self.data_name is not None:
            if replacing:
                _fsync(self.data_path)
            os.replace(self.data_path, directory / self.data_name)
        if replacing:
            _fsync(self.path)
        os.replace(self.path, self.destination)
        if replacing:
            _fsync_directory(directory)
        self.discard()

    def remove_superseded_data(self) -> tuple[Path, ...]:
        """After an in-place :meth:`commit`, delete :attr:`superseded_data`; return what was removed."""
        removed = []
        for file in self.superseded_data:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                removed.append(file)
        return tuple(removed)

    def discard(self) -> None:
        self._staging.cleanup()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


def is_same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file: any spelling, symlink or hard link."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist
        return False


def files_size_bytes(
    path: str | os.PathLike, model: ir.Model | None = None, *, read_files: set[Path] | None = None
) -> int:
    """Bytes of the model file plus the external data files it references (``<name>.data`` without ``model``).

    ``read_files``: those files (resolved paths), when the caller has them (see :func:`external_files`).
    """
    path = Path(path)
    total = path.stat().st_size
    files: set[Path] = set()
    if read_files is not None or model is not None:
        files = set(read_files) if read_files is not None else external_files(model)
    else:
        data = path.parent / external_data_name(path)
        if data.is_file():
            files.add(Path(os.path.realpath(data)))
    files.discard(Path(os.path.realpath(path)))  # a self-contained model read lazily refers to itself
    return total + sum(file.stat().st_size for file in files if file.is_file())


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
