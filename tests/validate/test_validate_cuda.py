"""CUDA execution provider: these run only where onnxruntime really executes on CUDA (else skipped, with why)."""

from __future__ import annotations

import pytest
from validate_builders import conv_bn_chain, folded, perturbed

from bnfold.validate import Verdict, verify
from bnfold.validate.environment import cuda_usable, probe_provider

CUDA_OK, CUDA_REASON = cuda_usable()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)]


@pytest.fixture(scope="module")
def chain():
    original = conv_bn_chain(3, channels=16, spatial=16, second_output=True)
    candidate, probes = folded(original)
    return original, candidate, probes


def test_cuda_probe_executes_on_cuda():
    probe = probe_provider("CUDAExecutionProvider")
    assert probe.works, probe
    assert probe.executed_by == "CUDAExecutionProvider"


def test_correct_fold_passes_on_cuda_with_tf32_off_and_a_noise_floor(chain):
    original, candidate, probes = chain
    report = verify(original, candidate, providers=("cpu", "cuda"), probes=probes, require_provider=True)
    assert report.verdict is Verdict.PASSED, report.to_json()
    cpu, cuda = report.runs
    assert cuda.executed_providers[0] == "CUDAExecutionProvider"
    assert cuda.cuda_tf32 is False and cpu.cuda_tf32 is None
    assert [metrics.name for metrics in cuda.noise_floor] == ["y", "z"]
    assert all(metrics.errors is not None for metrics in cuda.noise_floor)


def test_cuda_tf32_is_recorded(chain):
    original, candidate, _ = chain
    report = verify(original, candidate, providers=("cuda",), cuda_tf32=True, require_provider=True)
    assert report.runs[0].cuda_tf32 is True


def test_perturbed_fold_is_attributed_on_cuda(chain):
    original, candidate, probes = chain
    report = verify(original, perturbed(candidate, "w1"), providers=("cuda",), probes=probes)
    assert report.verdict is Verdict.FAILED
    assert report.responsible == ("bn1",)
