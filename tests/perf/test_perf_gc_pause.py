"""The cyclic collector is paused during bulk graph work and restored afterwards, also on errors."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from perf_model_factory import conv_bn_chain

import bnfold
from bnfold.errors import InvalidModelError
from bnfold.gc_pause import gc_paused
from bnfold.passes import FoldBatchNormPass
from bnfold.workflow import stage_fold


@pytest.fixture
def collector_enabled():
    was_enabled = gc.isenabled()
    gc.enable()
    yield
    if not was_enabled:
        gc.disable()


def test_paused_inside_restored_after_and_nesting_keeps_it_paused(collector_enabled) -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block restores the state it found: paused
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        if was_enabled:
            gc.enable()


def test_fold_pauses_the_collector_and_restores_it_even_on_error(collector_enabled, tmp_path: Path) -> None:
    seen: list[bool] = []
    source = conv_bn_chain(tmp_path / "chain.onnx", layers=2, channels=2, kernel=1)
    original_call = FoldBatchNormPass.call

    def spying_call(self, model):
        seen.append(gc.isenabled())
        return original_call(self, model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FoldBatchNormPass, "call", spying_call)
        staged = stage_fold(source, tmp_path / "out.onnx")
        staged.staged.discard()
        bnfold.fold(source)
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(InvalidModelError):
        stage_fold(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert gc.isenabled()
