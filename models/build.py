"""Build zoo models into ONNX files and describe them in a manifest.

``build_model`` exports one (model, exporter, opset, dtype, storage) combination; ``build_zoo`` exports the
whole matrix of :func:`zoo_matrix` and writes ``manifest.json``. Construction and calibration are seeded per
model and run single-threaded, so the same torch/onnx versions produce byte-identical files.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from models.common import calibrate_batchnorm, calibration_batch, single_threaded
from models.export import Exporter, export_model, fold_exporter_constants
from models.zoo import ZOO, ZooEntry, zoo_entry

DTYPES = {"float32": torch.float32, "float16": torch.float16}
CALIBRATION_BATCH = 16
EXPORT_BATCH = 2
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Variant:
    """How one file of a model is exported and stored.

    - ``constant_folded`` (dynamo only): run onnxscript's constant folding on the raw ``optimize=False``
      export (see :func:`models.export.fold_exporter_constants`).
    - ``initializers_as_inputs`` (TorchScript only): every initializer is also a graph input (PyTorch < 1.4's
      default ``keep_initializers_as_inputs=True``); with IR ≥ 4 such inputs are overridable at run time.
    - ``ir3`` (with ``initializers_as_inputs``): stamp IR version 3, as PyTorch 1.0 and Caffe2's exporter
      did; in IR 3 every initializer had to be listed as an input, so they are constants.
    """

    exporter: Exporter = Exporter.TORCHSCRIPT
    opset: int = 17
    dtype: str = "float32"
    external_data: bool = False
    initializers_as_inputs: bool = False
    ir3: bool = False
    constant_folded: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.ir3 and not self.initializers_as_inputs:
            raise ValueError("ir3 needs initializers_as_inputs (IR 3 lists every initializer as an input)")
        if self.constant_folded and self.exporter is not Exporter.DYNAMO:
            raise ValueError("constant_folded applies to the dynamo exporter only")

    @property
    def tag(self) -> str:
        """File-name suffix, e.g. ``torchscript-op17-fp16-ext`` or ``dynamo-op18-fp32-cf``."""
        parts = [self.exporter.value, f"op{self.opset}", {"float32": "fp32", "float16": "fp16"}[self.dtype]]
        flags = {
            "cf": self.constant_folded,
            "ext": self.external_data,
            "initinputs": self.initializers_as_inputs,
            "ir3": self.ir3,
        }
        return "-".join(parts + [flag for flag, present in flags.items() if present])


@dataclass(frozen=True)
class ManifestRecord:
    """One built file as written to ``manifest.json`` (paths relative to the manifest)."""

    file: str
    variant: str
    model: str
    family: str
    exporter: str
    opset: int
    dtype: str
    external_data: str | None
    initializers_as_inputs: bool
    constant_folded: bool
    batchnorm_count: int
    node_count: int
    ir_version: int
    size_bytes: int
    sha256: str
    input_name: str
    input_shape: list[int | str]
    producers: str
    note: str


#: The default run of ``build_zoo`` (the full matrix), per model: TorchScript at opsets 9/13/17/21, fp16, one
#: external-data file, initializers-as-inputs with IR 4 and IR 3; dynamo raw (``optimize=False``) at 18 and
#: constant-folded at 18/23 and in fp16.
FULL_MATRIX: tuple[Variant, ...] = (
    *(Variant(Exporter.TORCHSCRIPT, opset) for opset in (9, 13, 17, 21)),
    Variant(Exporter.TORCHSCRIPT, 17, "float16"),
    Variant(Exporter.TORCHSCRIPT, 17, external_data=True),
    Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True),
    Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True, ir3=True),
    Variant(Exporter.DYNAMO, 18),
    *(Variant(Exporter.DYNAMO, opset, constant_folded=True) for opset in (18, 23)),
    Variant(Exporter.DYNAMO, 18, "float16", constant_folded=True),
)

#: ``--quick``: TorchScript opset 17 and constant-folded dynamo opset 18.
QUICK_MATRIX: tuple[Variant, ...] = (
    Variant(Exporter.TORCHSCRIPT, 17),
    Variant(Exporter.DYNAMO, 18, constant_folded=True),
)


def zoo_matrix(quick: bool = False) -> tuple[Variant, ...]:
    """The variants built for every model."""
    return QUICK_MATRIX if quick else FULL_MATRIX


@functools.cache
def prepared_model(name: str) -> nn.Module:
    """The calibrated fp32 eval-mode module of zoo entry ``name`` (cached; callers must not modify it)."""
    entry = zoo_entry(name)
    torch.manual_seed(entry.seed)
    with single_threaded():
        model = entry.factory()
    shape = (CALIBRATION_BATCH, *entry.sample_shape)
    return calibrate_batchnorm(model, lambda generator: (calibration_batch(shape, generator),), seed=entry.seed)


def _export(entry: ZooEntry, exporter: Exporter, opset: int, dtype_name: str, initializers_as_inputs: bool) -> ir.Model:
    """Export the calibrated module of ``entry`` (cast to ``dtype_name``) with one torch exporter."""
    model = prepared_model(entry.name)
    dtype = DTYPES[dtype_name]
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    sample = torch.zeros((EXPORT_BATCH, *entry.sample_shape), dtype=dtype)
    with single_threaded():
        return export_model(
            model,
            (sample,),
            exporter=exporter,
            opset=opset,
            input_names=(entry.input_name,),
            output_names=(entry.output_name,),
            initializers_as_inputs=initializers_as_inputs,
        )


@functools.lru_cache(maxsize=4)
def _raw_dynamo_export(name: str, opset: int, dtype_name: str, initializers_as_inputs: bool) -> bytes:
    """The serialised raw dynamo export, shared by the raw and the constant-folded variant (the dynamo exporter
    takes seconds per model; both variants start from the same export)."""
    exported = _export(zoo_entry(name), Exporter.DYNAMO, opset, dtype_name, initializers_as_inputs)
    return ir.to_proto(exported).SerializeToString()


def export_variant(entry: ZooEntry, variant: Variant) -> ir.Model:
    """Export ``entry`` as ``variant`` into an in-memory ``onnx_ir`` model."""
    if variant.exporter is Exporter.DYNAMO:
        raw = _raw_dynamo_export(entry.name, variant.opset, variant.dtype, variant.initializers_as_inputs)
        exported = ir.from_proto(onnx.load_model_from_string(raw))
    else:
        exported = _export(entry, variant.exporter, variant.opset, variant.dtype, variant.initializers_as_inputs)
    if variant.constant_folded:
        fold_exporter_constants(exported)
    if variant.ir3:
        exported.ir_version = 3
    exported.graph.name = entry.name
    exported.doc_string = f"bnfold model zoo: {entry.name} ({entry.note}), {variant.tag}"
    return exported


def build_model(
    name: str,
    out_dir: str | Path,
    *,
    exporter: Exporter | str = Exporter.TORCHSCRIPT,
    opset: int = 17,
    dtype: str = "float32",
    external_data: bool = False,
    initializers_as_inputs: bool = False,
    ir3: bool = False,
    constant_folded: bool = False,
) -> Path:
    """Export zoo model ``name`` into ``out_dir`` and return the ``.onnx`` path (see :class:`Variant`).

    The file is ``<name>__<tag>.onnx`` (see :attr:`Variant.tag`); with ``external_data`` its weights go to
    ``<name>__<tag>.data`` beside it. Raises ``KeyError`` for an unknown name, ``ValueError`` for an opset the
    exporter does not emit, a dtype other than float32/float16, or flags that do not fit the exporter.
    """
    variant = Variant(Exporter(exporter), opset, dtype, external_data, initializers_as_inputs, ir3, constant_folded)
    return build_variant(name, variant, out_dir)


def build_variant(name: str, variant: Variant, out_dir: str | Path) -> Path:
    """Like :func:`build_model`, given a :class:`Variant`."""
    return _build(zoo_entry(name), variant, Path(out_dir))


def _build(entry: ZooEntry, variant: Variant, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{entry.name}__{variant.tag}.onnx"
    exported = export_variant(entry, variant)
    if variant.external_data:
        ir.save(exported, path, external_data=path.with_suffix(".data").name, size_threshold_bytes=1024)
    else:
        ir.save(exported, path)
    return path


def count_ops(model: ir.Model, op_type: str) -> int:
    """How many nodes of the default domain in the main graph and its subgraphs have ``op_type``."""
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == op_type and node.domain in ("", "ai.onnx")
    )


def describe(path: Path, entry: ZooEntry, variant: Variant, root: Path) -> ManifestRecord:
    """Manifest record of a built file (hashes cover the ``.onnx`` and its external data)."""
    model = ir.load(path)
    digest = hashlib.sha256(path.read_bytes())
    data_path = path.with_suffix(".data")
    size = path.stat().st_size
    if variant.external_data:
        digest.update(data_path.read_bytes())
        size += data_path.stat().st_size
    graph_input = model.graph.inputs[0]
    return ManifestRecord(
        file=path.relative_to(root).as_posix(),
        variant=variant.tag,
        model=entry.name,
        family=entry.family,
        exporter=variant.exporter.value,
        opset=model.opset_imports.get("", variant.opset),
        dtype=variant.dtype,
        external_data=data_path.relative_to(root).as_posix() if variant.external_data else None,
        initializers_as_inputs=variant.initializers_as_inputs,
        constant_folded=variant.constant_folded,
        batchnorm_count=count_ops(model, "BatchNormalization"),
        node_count=sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)),
        ir_version=model.ir_version,
        size_bytes=size,
        sha256=digest.hexdigest(),
        input_name=graph_input.name or "",
        input_shape=[dim if isinstance(dim, int) else str(dim) for dim in graph_input.shape or ()],
        producers=entry.producers,
        note=entry.note,
    )


def build_zoo(out_dir: str | Path, *, only: Sequence[str] | None = None, quick: bool = False) -> list[ManifestRecord]:
    """Build every (model, variant) of the zoo into ``out_dir`` and write ``out_dir/manifest.json``.

    ``only`` restricts to the named models (``KeyError`` for an unknown one); ``quick`` builds
    :data:`QUICK_MATRIX` instead of :data:`FULL_MATRIX`. Returns the manifest records in build order.
    """
    root = Path(out_dir)
    entries: Iterable[ZooEntry] = [zoo_entry(name) for name in only] if only else ZOO
    records = [
        describe(_build(entry, variant, root), entry, variant, root)
        for entry in entries
        for variant in zoo_matrix(quick)
    ]
    manifest = {
        "generator": "python -m models build",
        "torch": torch.__version__.split("+")[0],
        "models": [asdict(record) for record in records],
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return records
