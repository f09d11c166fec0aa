"""Graph work is linear: a chain of many tiny Conv+BN pairs folds completely (timings live in benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from perf_model_factory import conv_bn_chain

from bnfold.files import load_model
from bnfold.workflow import stage_fold


def _fold_chain(tmp_path: Path, pairs: int) -> None:
    source = conv_bn_chain(tmp_path / "chain.onnx", layers=pairs, channels=1, kernel=1)
    output = tmp_path / "folded.onnx"
    result = stage_fold(source, output)
    with result.staged as staged:
        staged.commit()
    report = result.report
    assert (len(report.folded), len(report.skipped)) == (pairs, 0)
    assert (report.nodes_before, report.nodes_after) == (2 * pairs, pairs)
    folded = load_model(output)
    assert [node.op_type for node in folded.graph].count("Conv") == pairs
    assert len(folded.graph.initializers) == 2 * pairs  # each Conv: weight + new bias; BN params pruned
    assert folded.graph.outputs[0].name == f"y{pairs - 1}"


def test_chain_of_2000_pairs_folds_completely(tmp_path: Path) -> None:
    _fold_chain(tmp_path, 2000)


@pytest.mark.slow
def test_chain_of_20000_pairs_folds_completely(tmp_path: Path) -> None:
    _fold_chain(tmp_path, 20_000)
