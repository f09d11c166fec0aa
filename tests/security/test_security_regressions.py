"""Every failure the fuzzer ever found, replayed; and short runs of the fuzzer itself.

``regressions/<name>/`` holds a minimised case (``model.onnx``, side files, ``finding.json`` with the
signature, seed and case number it was found with). Each must now be rejected with a
:class:`~bnfold.errors.BnfoldError` or fold cleanly, through the Python API and the CLI's streaming fold.
"""

from __future__ import annotations

import json
import random
import signal
import sys
from pathlib import Path

import onnx
import pytest

from fuzz.corpus import generate, load_corpus, read_case
from fuzz.harness import (
    CHECKER,
    CRASH,
    HANG,
    OK,
    PIPELINES,
    REJECTED,
    SMALL_STREAMING_THRESHOLDS,
    run_case,
)
from fuzz.minimise import minimise
from fuzz.mutate import mutate
from fuzz.runner import Settings, run_campaign
from fuzz.seeds import seed_cases

REGRESSIONS = Path(__file__).parent / "regressions"
CASES = sorted(path for path in REGRESSIONS.iterdir() if (path / "model.onnx").is_file())


@pytest.fixture
def small_streaming_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold.files import load

    for name, value in SMALL_STREAMING_THRESHOLDS.items():
        monkeypatch.setattr(load, name, value)


def test_regression_directory_is_not_empty() -> None:
    assert len(CASES) >= 5
    for case in CASES:
        finding = json.loads((case / "finding.json").read_text())
        assert {"signature", "seed", "index", "status"} <= set(finding)


# Findings not fixed yet (their owner has the report): strict xfails, so a fix shows up as a failure here.
# Name → (reason, pipelines in which it still fails).
KNOWN_FAILURES: dict[str, tuple[str, set[str]]] = {}


@pytest.mark.usefixtures("small_streaming_thresholds")
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("case_dir", CASES, ids=[path.name[:70] for path in CASES])
def test_fuzz_finding_no_longer_fails(
    case_dir: Path, pipeline: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reason, failing = KNOWN_FAILURES.get(case_dir.name, ("", set()))
    if pipeline in failing:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    outcome = run_case(read_case(case_dir), tmp_path, pipeline)
    assert outcome.status in (OK, REJECTED), f"{outcome.status}: {outcome.signature}\n{outcome.traceback}"


def test_mutants_are_reproducible() -> None:
    corpus = load_corpus(None)
    first = [generate(7, index, corpus) for index in range(20)]
    again = [generate(7, index, corpus) for index in range(20)]
    assert first == again
    assert len({case.model_bytes for _, case in first}) == 20


def test_every_seed_is_valid_and_folds_cleanly(tmp_path: Path) -> None:
    for name, case in seed_cases().items():
        directory = tmp_path / name
        directory.mkdir()
        onnx.checker.check_model(str(case.write(directory)), full_check=True)
        for pipeline in PIPELINES:
            assert run_case(case, tmp_path, pipeline).status == OK, (name, pipeline)


def test_minimise_keeps_the_failure_and_shrinks() -> None:
    base = seed_cases()["chain"]

    def has_relu(candidate) -> bool:
        model = onnx.ModelProto.FromString(candidate.model_bytes)
        return any(node.op_type == "Relu" for node in model.graph.node)

    smallest = minimise(base, has_relu, budget_seconds=30)
    model = onnx.ModelProto.FromString(smallest.model_bytes)
    assert [node.op_type for node in model.graph.node] == ["Relu"]
    assert len(model.graph.initializer) == 0
    assert len(smallest.model_bytes) < len(base.model_bytes) // 10


def test_harness_flags_an_output_that_fails_the_checker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fuzz import harness

    real = harness._fold_and_save

    def corrupting(source: Path, output: Path, pipeline: str) -> None:
        real(source, output, pipeline)
        model = onnx.load(output)
        model.graph.node[0].input[0] = "undefined_value"
        onnx.save(model, output)

    monkeypatch.setattr(harness, "_fold_and_save", corrupting)
    outcome = run_case(seed_cases()["conv_bn"], tmp_path)
    assert outcome.status == CHECKER and outcome.failed


def test_short_fuzz_campaign_finds_nothing_new() -> None:
    # A fixed seed keeps this test deterministic; `python -m fuzz` in .ci/run explores new cases every run.
    summary = run_campaign(Settings(seconds=60, seed=2024, max_iterations=250, store=None))
    assert summary.iterations == 250
    assert summary.findings == {}, {sig: finding.to_dict() for sig, finding in summary.findings.items()}


_MISBEHAVING_WORKER = """
import json, os, signal, sys, time
arguments = dict(argument.split("=", 1) for argument in sys.argv[2:] if "=" in argument)
index = int(arguments["--start"])
with os.fdopen(int(arguments["--fd"]), "w", buffering=1) as events:
    events.write(json.dumps({"event": "start", "index": index}) + "\\n")
    if index % 2 == 0:
        time.sleep(60)  # even cases hang
    os.kill(os.getpid(), signal.SIGKILL)  # odd cases kill the worker
"""


def test_runner_reports_hangs_and_dead_workers_and_carries_on(tmp_path: Path) -> None:
    worker = tmp_path / "misbehaving_worker.py"
    worker.write_text(_MISBEHAVING_WORKER)
    settings = Settings(
        seconds=60, seed=1, max_iterations=4, store=None, case_timeout=0.5, worker=(sys.executable, str(worker))
    )
    summary = run_campaign(settings)
    assert summary.iterations == 4
    assert summary.counts == {HANG: 2, CRASH: 2}
    assert set(summary.findings) == {"hang", f"worker-died:{-signal.SIGKILL}"}
    assert summary.findings["hang"].count == 2 and summary.findings["hang"].index == 0


def test_mutation_never_breaks_the_mutator() -> None:
    rng = random.Random(11)
    cases = seed_cases()
    for _ in range(300):
        mutate(cases[rng.choice(sorted(cases))], rng)  # must not raise for any seed
