"""What folding a zoo model must do, and the CLI round trip that checks it (shared by the e2e tests).

Expectations come from the architecture (``ZooEntry.unfoldable_batchnorms`` / ``linear_batchnorms``) and from
how the file was exported (:class:`models.build.Variant`), never from the folder's own analysis.
"""

from __future__ import annotations

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
from models.export import Exporter
from models.zoo import ZooEntry

#: Producers a BN can be folded into (backwards).
FOLDABLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


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


def expected_skip_reasons(entry: ZooEntry, variant: Variant) -> frozenset[SkipReason]:
    """Reasons a BN of this file may legitimately be skipped for."""
    reasons = {SkipReason.UNSUPPORTED_PRODUCER} if entry.unfoldable_batchnorms else set()
    if not params_are_constant(variant):
        reasons |= {SkipReason.BN_PARAMS_NOT_CONSTANT, SkipReason.WEIGHT_NOT_CONSTANT}
    if variant.exporter is Exporter.DYNAMO and not variant.constant_folded:
        reasons.add(SkipReason.BIAS_NOT_CONSTANT)
    return frozenset(reasons)
