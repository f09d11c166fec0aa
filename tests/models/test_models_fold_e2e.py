"""Every zoo model folded and verified end to end through the ``bnfold`` CLI.

The default run covers every architecture once (TorchScript, opset 17, fp32) plus a representative of each
other export path; the whole matrix (:data:`models.build.FULL_MATRIX` × every model) is ``slow``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
from pathlib import Path

import onnx_ir as ir
import pytest
from models_expectations import (
    NEW_ARCHITECTURES,
    CliFold,
    assert_folds_every_foldable_batchnorm,
    assert_sound_fold,
    describe_skips,
    expected_skip_reasons,
    fold_with_cli,
    params_are_constant,
    unfoldable_records,
)

from bnfold.cli import main
from bnfold.passes import SkipReason, rule_names
from models.build import FULL_MATRIX, Variant, count_ops
from models.demo import DEMO_PATH
from models.export import Exporter
from models.zoo import ZOO, ZooEntry, zoo_entry

TORCHSCRIPT_17 = Variant(Exporter.TORCHSCRIPT, 17)
DYNAMO_18_RAW = Variant(Exporter.DYNAMO, 18)
DYNAMO_18_CF = Variant(Exporter.DYNAMO, 18, constant_folded=True)

#: (model, variant) pairs of the default run besides TorchScript opset 17 fp32 for every model.
REPRESENTATIVES: tuple[tuple[str, Variant], ...] = (
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 17, "float16")),
    ("densenet", Variant(Exporter.TORCHSCRIPT, 17, "float16")),
    ("unet", Variant(Exporter.TORCHSCRIPT, 17, "float16")),
    ("unet", Variant(Exporter.TORCHSCRIPT, 17, external_data=True)),
    ("mobilenet_v3", Variant(Exporter.TORCHSCRIPT, 9)),
    ("efficientnet_b0", Variant(Exporter.TORCHSCRIPT, 21)),
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True)),
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True, ir3=True)),
    ("densenet", Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True, ir3=True)),
    ("resnet_basic", Variant(Exporter.DYNAMO, 18)),
    ("unet", DYNAMO_18_CF),
    ("video_cnn", DYNAMO_18_CF),
    ("mlp", DYNAMO_18_CF),
    ("shufflenet_v2", Variant(Exporter.DYNAMO, 18, "float16", constant_folded=True)),
    *((name, DYNAMO_18_CF) for name in NEW_ARCHITECTURES),
)

DEFAULT_CASES = [(entry.name, TORCHSCRIPT_17) for entry in ZOO] + list(REPRESENTATIVES)
FULL_CASES = [
    (entry.name, variant) for entry in ZOO for variant in FULL_MATRIX if (entry.name, variant) not in DEFAULT_CASES
]


def case_id(case: tuple[str, Variant]) -> str:
    name, variant = case
    return f"{name}-{variant.tag}"


def check_zoo_fold(entry: ZooEntry, variant: Variant, result: CliFold, batchnorm_count: int) -> None:
    """The zoo contract: sound fold, every foldable BN folded, every remaining BN skipped for a reason that
    this architecture and export path explain."""
    assert_sound_fold(result, batchnorm_count)
    allowed = expected_skip_reasons(entry, variant)
    linear_rules = {"gemm", "matmul"} & set(rule_names())
    rank_unknown = [
        record
        for record in result.skipped(SkipReason.RANK_UNKNOWN)
        if record["producer"] == "MatMul" and entry.linear_batchnorms
    ]
    unexplained = [
        record
        for record in result.skipped()
        if SkipReason(record["reason"]) not in allowed and record not in rank_unknown
    ]
    assert not unexplained, f"{entry.name}: skipped for a reason this file does not explain:\n" + describe_skips(
        unexplained
    )
    if params_are_constant(variant):  # raw dynamo included: its computed zero biases are evaluated
        not_into_producer = unfoldable_records(result)
        expected = entry.unfoldable_batchnorms + (0 if linear_rules else entry.linear_batchnorms)
        assert len(not_into_producer) == expected, (
            f"{entry.name}: {len(not_into_producer)} BNs kept, {expected} expected:\n"
            + describe_skips(not_into_producer)
        )
        assert all(record["producer"] not in {"Conv", "ConvTranspose"} for record in not_into_producer)
        assert len(result.folded_records) == batchnorm_count - len(not_into_producer) - len(rank_unknown)
    if not params_are_constant(variant):
        assert result.folded_records == []
    if rank_unknown:
        pytest.xfail(
            f"{len(rank_unknown)} BN after a bias-less Linear (TorchScript exports it as MatMul without recording "
            "the MatMul output's rank) skipped as RANK_UNKNOWN: bnfold does not run shape inference"
        )


def run_case(zoo, tmp_path: Path, name: str, variant: Variant) -> None:
    model = zoo.get(name, variant)
    batchnorm_count = count_ops(ir.load(model), "BatchNormalization")
    result = fold_with_cli(model, tmp_path)
    check_zoo_fold(zoo_entry(name), variant, result, batchnorm_count)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_folds_zoo_model_end_to_end(zoo, tmp_path: Path, case: tuple[str, Variant]) -> None:
    run_case(zoo, tmp_path, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=case_id)
def test_folds_zoo_matrix_end_to_end(zoo, tmp_path: Path, case: tuple[str, Variant]) -> None:
    run_case(zoo, tmp_path, *case)


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_folds_raw_dynamo_export_of_new_architectures(zoo, tmp_path: Path, name: str) -> None:
    """``torch.onnx.export(dynamo=True, optimize=False)`` as docs/rules.md recommends: the computed zero biases of
    bias-less Convs, LeViT's Linear+BN, the mixed-kernel Concats and the forward folds into the head all fold;
    only the architecture's unfoldable BNs stay."""
    model = zoo.get(name, DYNAMO_18_RAW)
    batchnorm_count = count_ops(ir.load(model), "BatchNormalization")
    assert_folds_every_foldable_batchnorm(zoo_entry(name), fold_with_cli(model, tmp_path), batchnorm_count)


def test_verify_command_accepts_the_folded_demo(tmp_path: Path) -> None:
    folded = fold_with_cli(DEMO_PATH, tmp_path, "--no-verify")
    report = tmp_path / "verify.json"
    with contextlib.redirect_stdout(io.StringIO()):
        exit_code = main(["verify", str(DEMO_PATH), str(folded.folded), "--json", str(report)])
    assert exit_code == 0
    document = json.loads(report.read_text())
    assert document["verdict"] == "passed"
    assert document["outputs"] == ["logits"]


def test_refolding_a_folded_zoo_model_folds_nothing(zoo, tmp_path: Path) -> None:
    first = fold_with_cli(zoo.get("densenet", TORCHSCRIPT_17), tmp_path / "first")
    second = fold_with_cli(first.folded, tmp_path / "second")
    assert second.exit_code == 0
    assert second.document["fold"]["batch_norm_folded"] == 0
    assert second.document["fold"]["batch_norm_total"] == 8
    # 6 BNs read a Concat that other nodes read too (dense connectivity), 2 read a pooling.
    reasons = collections.Counter(record["reason"] for record in second.records)
    assert reasons == {"PRODUCER_OUTPUT_SHARED": 6, "UNSUPPORTED_PRODUCER": 2}


def test_refolding_a_folded_zoo_model_writes_identical_bytes(zoo, tmp_path: Path) -> None:
    first = fold_with_cli(zoo.get("densenet", TORCHSCRIPT_17), tmp_path / "first", "--no-verify")
    second = fold_with_cli(first.folded, tmp_path / "second", "--no-verify")
    assert second.folded.read_bytes() == first.folded.read_bytes()


def test_folded_external_data_model_keeps_external_data(zoo, tmp_path: Path) -> None:
    result = fold_with_cli(zoo.get("unet", Variant(Exporter.TORCHSCRIPT, 17, external_data=True)), tmp_path)
    assert result.exit_code == 0
    data = result.folded.with_name(result.folded.name + ".data")
    assert data.is_file()
    assert data.stat().st_size > result.folded.stat().st_size
    assert result.document["fold"]["batch_norm_folded"] == 12
