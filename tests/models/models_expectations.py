"""What folding a zoo model must do, and the CLI round trip that checks it (shared by the e2e tests).

Expectations come from the architecture (``ZooEntry.unfoldable_batchnorms`` / ``linear_batchnorms``) and from
how the file was exported (:class:`models.build.Variant`), never from the folder's own analysis.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bnfold.cli import main
from bnfold.passes import SkipReason
from models.build import Variant, count_ops
from models.zoo import ZooEntry

#: Neighbours a folded BN's record may name: producers folded into backwards (a Concat is split into the Convs
#: feeding it) and the Conv/Gemm/MatMul a BN folds forward into.
FOLDABLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Concat"})

#: Ops a BN's output may pass through on its way forward to a Linear: inference no-ops, flattens, and global
#: average pooling (a per-channel affine commutes with averaging over the spatial axes).
FORWARD_PASS_THROUGH = frozenset({"Dropout", "Identity", "Flatten", "Reshape", "GlobalAveragePool", "ReduceMean"})

#: Reasons an architecturally unfoldable BN is skipped for: no rule for its producer or consumer
#: (``UNSUPPORTED_PRODUCER``), or a rule's producer whose output other nodes read too (``PRODUCER_OUTPUT_SHARED``:
#: DenseNet's Concats, which the Concat split rule cannot divide among Convs they share).
UNFOLDABLE_REASONS = frozenset({SkipReason.UNSUPPORTED_PRODUCER, SkipReason.PRODUCER_OUTPUT_SHARED})

#: The architectures of issue 13 (LeViT Linear+BN, mixed-kernel Concat, forward folds into a Linear).
NEW_ARCHITECTURES = ("levit", "mixnet", "face_head", "convmixer")

#: The ``ZooEntry`` count fields, by the class :func:`batchnorm_class` gives a BN ("conv" is the rest).
BATCHNORM_CLASSES = {
    "unfoldable": "unfoldable_batchnorms",
    "linear": "linear_batchnorms",
    "forward_linear": "forward_linear_batchnorms",
    "token_linear": "token_linear_batchnorms",
    "concat": "concat_batchnorms",
}


@dataclass(frozen=True)
class CliFold:
    """One ``bnfold MODEL -o OUT --json J`` run: exit code, parsed JSON document, paths, captured output."""

    exit_code: int
    document: dict[str, Any]
    original: Path
    folded: Path
    output: str

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.document["fold"]["records"]

    def skipped(self, reason: SkipReason | None = None) -> list[dict[str, Any]]:
        return [
            record
            for record in self.records
            if record["status"] == "skipped" and (reason is None or record["reason"] == reason.value)
        ]

    @property
    def folded_records(self) -> list[dict[str, Any]]:
        return [record for record in self.records if record["status"] == "folded"]


def fold_with_cli(model: Path, out_dir: Path, *extra: str) -> CliFold:
    """Fold (and, by default, verify) ``model`` through ``bnfold.cli.main`` with a JSON report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = out_dir / f"{model.stem}.folded.onnx"
    report = out_dir / f"{model.stem}.json"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        exit_code = main([str(model), "-o", str(folded), "--json", str(report), *extra])
    document = json.loads(report.read_text()) if report.exists() else {}
    return CliFold(exit_code, document, model, folded, captured.getvalue())


def params_are_constant(variant: Variant) -> bool:
    """False for IR ≥ 4 files listing initializers as graph inputs: those are overridable at run time."""
    return not (variant.initializers_as_inputs and not variant.ir3)


def assert_sound_fold(result: CliFold, batchnorm_count: int) -> None:
    """Invariants for every zoo file: exit 0, verification passed, counts consistent, reasons everywhere."""
    assert result.exit_code == 0, result.output
    fold = result.document["fold"]
    assert result.document["verify"]["verdict"] == "passed", result.output
    assert fold["batch_norm_total"] == batchnorm_count
    assert fold["batch_norm_folded"] + fold["batch_norm_skipped"] == batchnorm_count
    for record in result.skipped():
        assert record["reason"] in SkipReason.__members__, record
        assert record["detail"], record
    for record in result.folded_records:
        assert record["producer"] in FOLDABLE_PRODUCERS, record
        assert record["rule"], record
    folded_model = ir.load(result.folded)
    assert count_ops(folded_model, "BatchNormalization") == fold["batch_norm_skipped"]
    assert fold["nodes_after"] == sum(1 for _ in ir.traversal.RecursiveGraphIterator(folded_model.graph))
    # A fold removes the BN; only a bias-less MatMul needs a new Add for the shift.
    assert fold["nodes_after"] <= fold["nodes_before"]


def expected_batchnorm_classes(entry: ZooEntry, batchnorm_count: int) -> collections.Counter[str]:
    """The catalogue's counts of ``entry`` by class; every BN not counted elsewhere follows a Conv."""
    counts = collections.Counter({name: getattr(entry, field) for name, field in BATCHNORM_CLASSES.items()})
    counts["conv"] = batchnorm_count - sum(counts.values())
    return +counts


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].idx == 0 and not value.is_graph_output() else None


def batchnorm_class(batch_norm: ir.Node) -> str:
    """How a BN of an exported file can be folded, read off its neighbours (independently of bnfold).

    Backwards: ``conv`` (Conv/ConvTranspose), ``linear`` (Gemm/MatMul), ``token_linear`` (MatMul → Flatten/
    Reshape → BN), ``concat`` (Concat of Convs each read by the Concat alone). Otherwise forwards:
    ``forward_linear`` when the output reaches one Gemm/MatMul through :data:`FORWARD_PASS_THROUGH` ops, each
    the single reader of the previous value. Anything else is ``unfoldable``.
    """
    producer = batch_norm.inputs[0].producer()
    op_type = producer.op_type if producer is not None else None
    if op_type in ("Conv", "ConvTranspose"):
        return "conv"
    if op_type in ("Gemm", "MatMul"):
        return "linear"
    if op_type in ("Flatten", "Reshape"):
        inner = producer.inputs[0].producer()
        if inner is not None and inner.op_type == "MatMul":
            return "token_linear"
    if op_type == "Concat" and all(
        value is not None
        and value.producer() is not None
        and value.producer().op_type == "Conv"
        and [use.node for use in value.uses()] == [producer]
        for value in producer.inputs
    ):
        return "concat"
    reader = _only_reader(batch_norm.outputs[0])
    while reader is not None and reader.op_type in FORWARD_PASS_THROUGH:
        reader = _only_reader(reader.outputs[0])
    if reader is not None and reader.op_type in ("Gemm", "MatMul"):
        return "forward_linear"
    return "unfoldable"


def batchnorm_classes(model: ir.Model) -> collections.Counter[str]:
    """:func:`batchnorm_class` of every BN of the main graph, counted."""
    return collections.Counter(batchnorm_class(node) for node in model.graph if node.op_type == "BatchNormalization")


def describe_skips(records: list[dict[str, Any]]) -> str:
    """One line per skipped record: BN name, neighbour, reason, detail (for assertion messages)."""
    return "\n".join(
        f"  {record['node']}: {record['producer']} {record['reason']}: {record['detail']}" for record in records
    )


def unfoldable_records(result: CliFold) -> list[dict[str, Any]]:
    """The skipped records whose reason is one of :data:`UNFOLDABLE_REASONS`."""
    return [record for record in result.skipped() if SkipReason(record["reason"]) in UNFOLDABLE_REASONS]


def assert_folds_every_foldable_batchnorm(entry: ZooEntry, result: CliFold, batchnorm_count: int) -> None:
    """Exactly the architecture's unfoldable BNs stay, each for one of :data:`UNFOLDABLE_REASONS`; every other
    BN folded."""
    assert_sound_fold(result, batchnorm_count)
    stayed = unfoldable_records(result)
    unexpected = [record for record in result.skipped() if record not in stayed]
    assert not unexpected, f"{entry.name}: skipped for a reason the architecture does not explain:\n" + describe_skips(
        unexpected
    )
    assert len(stayed) == entry.unfoldable_batchnorms, (
        f"{entry.name}: {len(stayed)} BNs kept, {entry.unfoldable_batchnorms} expected:\n" + describe_skips(stayed)
    )
    assert len(result.folded_records) == batchnorm_count - entry.unfoldable_batchnorms


def expected_skip_reasons(entry: ZooEntry, variant: Variant) -> frozenset[SkipReason]:
    """Reasons a BN of this file may legitimately be skipped for."""
    reasons = set(UNFOLDABLE_REASONS) if entry.unfoldable_batchnorms else set()
    if not params_are_constant(variant):
        reasons |= {SkipReason.BN_PARAMS_ARE_GRAPH_INPUTS, SkipReason.WEIGHT_IS_GRAPH_INPUT}
    # Raw dynamo exports (constant_folded=False) compute a bias-less Conv's zero bias at run time; the constant
    # evaluator (passes/constant_eval.py) sees through it, so no reason is added for them.
    return frozenset(reasons)
