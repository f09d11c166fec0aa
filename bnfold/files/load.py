"""Loading models into ``onnx_ir``: checked before anything looks at them, external data left on disk.

:func:`load_model` parses a file (external tensors stay on disk and are memory-mapped when read);
:func:`open_lazily` also leaves a large self-contained file's weights on disk (a wire-level scan turns each
large initializer into a reference to its byte range, :mod:`bnfold.files.wire`), so loading costs the graph
structure, not the weights. Every loader checks the model (:mod:`bnfold.files.checks`) and ends with
:func:`finish_loading`. Loading never modifies the input.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bnfold.errors import BnfoldError, InvalidModelError, UsageError, one_line
from bnfold.files.checks import check_external_data, check_model_proto, iter_tensor_protos
from bnfold.files.inputs import open_regular_file, shown_path
from bnfold.files.paths import external_data_name
from bnfold.files.wire import UnsupportedLayout, scan_self_referencing
from bnfold.passes.scopes import model_graphs

# What every API that takes a model accepts: a path (loaded lazily), an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
ModelInput = str | os.PathLike | onnx.ModelProto | ir.Model
# ``ir.Model.meta`` key set by the loaders: frozenset of the resolved files the model was read from.
SOURCE_FILES_META = "bnfold.source_files"
# ``ir.Model.meta`` key set by the loaders: whether the model read tensors from external-data files (other than
# the model file itself). Saving keeps that layout even after folding replaced every external tensor.
SOURCE_EXTERNAL_META = "bnfold.source_had_external_data"
# ``ir.Model.meta`` key set by the loaders: frozenset of the names of initializers whose type the source file
# recorded in ``value_info``. onnx_ir gives every initializer a type and writes one for each; the writer drops the
# entries the source did not have (:func:`bnfold.files.serialize.write_model`), so an unchanged model stays the same.
INITIALIZER_INFO_META = "bnfold.initializer_value_info"
# Main-graph initializers at least this large are read lazily from a self-contained file (:func:`open_lazily`).
LAZY_TENSOR_BYTES = 64 * 1024
# Below this file size a self-contained model is parsed whole (the wire scan would not pay off).
LAZY_FILE_BYTES = 16 * 1024**2
# What onnx_ir raises for a checked protobuf it cannot represent (its serde wraps its own failures in SerdeError;
# value errors come from unknown enum values and malformed fields). Anything else is a bug and surfaces as one.
_NOT_REPRESENTABLE = (ir.serde.SerdeError, ValueError, TypeError, KeyError, IndexError)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load the model at ``path``; external tensors stay on disk and are memory-mapped when read.

    The model is checked before anything else looks at it (see :func:`~bnfold.files.checks.check_model_proto` and
    :func:`check_external_data`), so a malformed or hostile file ends here with one clear message.

    Raises:
        InvalidModelError: the path is missing or not a file, the bytes are not an ONNX model, the graph is
            malformed, or an external-data reference is unsafe or broken.
    """
    path = Path(path)
    shown = shown_path(path)  # (a name with a newline or other control character is shown escaped: one line)
    try:
        # A FIFO, device or directory is never read (a FIFO would block), not even one swapped in after a check:
        # the file is checked again on the opened descriptor and parsed from that descriptor.
        with open_regular_file(path, "", error=InvalidModelError) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise InvalidModelError(f"{shown}: empty file")
            proto = onnx.load_model_from_string(handle.read())  # (what onnx.load does; weights stay external)
    except InvalidModelError:
        raise
    except OSError as error:  # permission denied, I/O error, name too long
        raise InvalidModelError(f"{shown}: cannot read ({error.strerror or one_line(error)})") from error
    except (DecodeError, RecursionError) as error:  # bytes that are not a protobuf ModelProto (or nested too deep)
        raise InvalidModelError(f"{shown}: not a valid ONNX model ({one_line(error)})") from error
    # (anything else raised here is a bug in bnfold, not in the file: it surfaces as an internal error)
    check_model_proto(proto, source=shown)
    check_external_data(proto, path.parent, source=shown)
    model = _deserialize(proto, source=shown)
    finish_loading(model, path.parent, source=path, proto=proto)
    return model


def as_model(model: ModelInput) -> ir.Model:
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
        finish_loading(loaded, None, source="<ModelProto>", proto=model)
        return loaded
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def open_lazily(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` so that no large tensor is read before it is used (see the module docstring).

    External data is validated like :func:`bnfold.load_model` does. Small files, hard-linked files (which
    ``onnx_ir`` refuses to memory-map) and unusual protobuf layouts are loaded with :func:`bnfold.load_model`.

    Raises:
        InvalidModelError: as :func:`bnfold.load_model`.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return load_model(path)
    if not path.is_file() or stat.st_size < LAZY_FILE_BYTES or stat.st_nlink > 1:
        return load_model(path)
    try:
        proto = scan_self_referencing(path, LAZY_TENSOR_BYTES)
    except UnsupportedLayout:
        return load_model(path)
    check_model_proto(proto, source=shown_path(path))
    check_external_data(proto, path.parent, source=shown_path(path))
    model = _deserialize(proto, source=shown_path(path))
    finish_loading(model, path.parent, source=path, proto=proto)
    return model


def finish_loading(
    model: ir.Model, base_dir: Path | None, *, source: object, proto: onnx.ModelProto | None = None
) -> None:
    """Complete a model deserialised from a checked protobuf (every loader calls this last).

    - external tensors resolve against ``base_dir``, the model file's directory (``None``: no file);
    - external FLOAT6 initializers are read once, since their packing is validated only when decoded;
    - external tensors held by node attributes (Constant values) are read into memory: only initializers are
      written back as external data, so such a reference would point at a file the output lacks;
    - ``model.meta[SOURCE_FILES_META]`` records the resolved paths of the model file (``source`` when it is a
      path) and of every external-data file it reads, so that a writer can refuse to replace any of them even
      after folding dropped the last tensor that read a file (``model.clone()`` does not copy ``meta``);
    - ``model.meta[SOURCE_EXTERNAL_META]`` records whether it read external data from another file, so a save
      keeps that layout after folding replaced every external tensor; ``model.meta[INITIALIZER_INFO_META]`` the
      initializers ``proto`` (the checked protobuf, when given) declared in ``value_info``;
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
        except (ValueError, RuntimeError) as error:  # a cycle check_model_proto did not see (through a subgraph)
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
    external = bool(source_files)
    if isinstance(source, (str, os.PathLike)):
        itself = Path(os.path.realpath(source))
        external = bool(source_files - {itself})  # (a large file read lazily refers to itself: not external data)
        source_files.add(itself)
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
    model.meta[SOURCE_EXTERNAL_META] = external
    if proto is not None:
        model.meta[INITIALIZER_INFO_META] = frozenset(_initializer_info_names(proto))


def _initializer_info_names(proto: onnx.ModelProto) -> set[str]:
    """Names of the initializers that have a ``value_info`` entry in their graph (main graph and subgraphs)."""
    names: set[str] = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        initializers = {tensor.name for tensor in graph.initializer}
        initializers.update(sparse.values.name for sparse in graph.sparse_initializer)
        names.update(info.name for info in graph.value_info if info.name in initializers)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return names


def _in_memory(tensor: ir.TensorProtocol, source: object) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    try:
        return ir.Tensor(tensor.numpy().copy(), name=tensor.name)
    except (OSError, *_NOT_REPRESENTABLE) as error:  # unreadable, or bytes that do not decode as the tensor
        message = f"{source}: tensor {tensor.name!r}: cannot read external data ({one_line(error)})"
        raise InvalidModelError(message) from error


def _deserialize(proto: onnx.ModelProto, *, source: object) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except (*_NOT_REPRESENTABLE, RecursionError) as error:
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


def read_model_proto(path: Path) -> onnx.ModelProto:
    """The model proto of the regular file ``path`` (external weights not loaded), read from the descriptor that
    was checked to be a regular file (:func:`~bnfold.files.inputs.open_regular_file`): a FIFO swapped in after a
    check is refused, never read. Raises :class:`InvalidModelError`, or protobuf's error for bytes that are not a
    model."""
    with open_regular_file(path, "", error=InvalidModelError) as handle:
        return onnx.load_model_from_string(handle.read())


def data_files_of(path: str | os.PathLike) -> set[Path]:
    """The external-data files the model file ``path`` refers to (resolved), read without loading any weight.

    For an output plan that must know them before the model is loaded (``bnfold verify``, ``bnfold check``).
    A large file is read with the wire-level scan (cost: the graph structure); a file that is not a readable
    model yields no file (its loader reports the problem later). Nothing is checked here.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return set()
        if path.stat().st_size >= LAZY_FILE_BYTES:
            try:
                proto = scan_self_referencing(path, LAZY_TENSOR_BYTES)
            except UnsupportedLayout:
                proto = read_model_proto(path)
        else:
            proto = read_model_proto(path)
    except (BnfoldError, OSError, DecodeError, RecursionError):  # not a model: the loader says so, in its words
        return set()
    files = set()
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            if location and "\x00" not in location:
                files.add(Path(os.path.realpath(path.parent / location)))
    files.discard(Path(os.path.realpath(path)))  # (the wire scan's references into the file itself)
    return files
