"""Drive worker processes for a bounded time, watch every case with a timeout, store each new failure.

Failures are told apart by their signature (stage, exception type, innermost bnfold frame; see
:func:`fuzz.harness.failure_signature`). The first case of each new signature is minimised in a separate
worker and stored as ``<store>/<slug>/`` (``model.onnx``, side files, ``finding.json``), which
``tests/security/test_security_regressions.py`` replays. Signatures already stored are still counted as
failures (the bug is not fixed) but not stored again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fuzz.corpus import FINDING_FILE, generate, load_corpus, write_case
from fuzz.harness import CRASH, FAILURES, HANG

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO_ROOT / "tests" / "security" / "regressions"


@dataclasses.dataclass
class Finding:
    signature: str
    status: str
    seed: int
    index: int
    base: str
    message: str
    stored: str | None = None
    count: int = 1

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Summary:
    seed: int
    iterations: int = 0
    seconds: float = 0.0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    findings: dict[str, Finding] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.findings)


@dataclasses.dataclass(frozen=True)
class Settings:
    seconds: float
    seed: int
    corpus: Path | None = None
    jobs: int = 1
    case_timeout: float = 20.0
    memory_mb: int = 4096
    store: Path | None = DEFAULT_STORE
    max_iterations: int | None = None
    minimise_budget: float = 60.0
    scratch: Path | None = None
    # The worker program (``fuzz.worker`` by default); tests substitute a misbehaving one.
    worker: tuple[str, ...] = ()


def stored_signatures(store: Path | None) -> set[str]:
    if store is None or not store.is_dir():
        return set()
    signatures = set()
    for finding in store.glob(f"*/{FINDING_FILE}"):
        signatures.add(json.loads(finding.read_text())["signature"])
    return signatures


def slug(signature: str, digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", signature).strip("-")[:80] + "-" + digest[:8]


class _Worker:
    """One ``fuzz.worker run`` process and the case it is on."""

    def __init__(self, settings: Settings, start: int, stride: int, stop: int, deadline: float) -> None:
        read_fd, write_fd = os.pipe()
        command = [
            *(settings.worker or (sys.executable, "-m", "fuzz.worker")),
            "run",
            f"--seed={settings.seed}",
            f"--start={start}",
            f"--stride={stride}",
            f"--stop={stop}",
            f"--deadline={deadline}",
            f"--fd={write_fd}",
            f"--memory-mb={settings.memory_mb}",
        ]
        if settings.corpus is not None:
            command.append(f"--corpus={settings.corpus}")
        if settings.scratch is not None:
            command.append(f"--scratch={settings.scratch}")
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command,
            pass_fds=(write_fd,),
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(write_fd)
        self.events = read_fd
        self._pending = b""
        self.stride = stride
        self.current: int | None = None
        self.started_at = time.monotonic()

    def read_events(self) -> list[dict[str, object]] | None:
        """Every complete event line available now; ``None`` at end of file (the worker exited)."""
        data = os.read(self.events, 1 << 16)
        if not data:
            return None
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        return [json.loads(line) for line in lines if line]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.events)


def run_campaign(settings: Settings, progress: Callable[[Summary], None] | None = None) -> Summary:
    """Fuzz for ``settings.seconds`` (or ``max_iterations`` cases); return counts and findings."""
    summary = Summary(seed=settings.seed)
    known = stored_signatures(settings.store)
    corpus = load_corpus(settings.corpus)
    started = time.monotonic()
    deadline = time.time() + settings.seconds
    stop = settings.max_iterations if settings.max_iterations is not None else 2**62
    selector = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def spawn(start: int, stride: int) -> None:
        if start >= stop or time.time() >= deadline:
            return
        worker = _Worker(settings, start, stride, stop, deadline)
        workers.append(worker)
        selector.register(worker.events, selectors.EVENT_READ, worker)

    def retire(worker: _Worker) -> None:
        selector.unregister(worker.events)
        worker.kill()
        workers.remove(worker)

    def record(status: str, signature: str, index: int, base: str, message: str) -> None:
        finding = summary.findings.get(signature)
        if finding is not None:
            finding.count += 1
            return
        finding = Finding(signature, status, settings.seed, index, base, message)
        summary.findings[signature] = finding
        if settings.store is not None and signature not in known:
            finding.stored = str(_store(settings, corpus, finding))
            known.add(signature)

    for offset in range(settings.jobs):
        spawn(offset, settings.jobs)
    last_progress = time.monotonic()
    while workers:
        for key, _ in selector.select(timeout=0.2):
            worker: _Worker = key.data
            events = worker.read_events()
            if events is None:  # the worker exited: normally, or killed while on a case
                retire(worker)
                if worker.current is not None:
                    code = worker.process.returncode
                    summary.iterations += 1
                    summary.counts[CRASH] += 1
                    record(CRASH, f"worker-died:{code}", worker.current, "?", f"worker exited with {code}")
                    spawn(worker.current + worker.stride, worker.stride)
                continue
            for event in events:
                if event["event"] == "start":
                    worker.current, worker.started_at = event["index"], time.monotonic()
                    continue
                worker.current = None
                outcome = event["outcome"]
                summary.iterations += 1
                summary.counts[outcome["status"]] += 1
                if outcome["status"] in FAILURES - {HANG}:
                    record(outcome["status"], outcome["signature"], event["index"], event["base"], outcome["message"])
        now = time.monotonic()
        for worker in list(workers):
            if worker.current is not None and now - worker.started_at > settings.case_timeout:
                index = worker.current
                retire(worker)
                summary.iterations += 1
                summary.counts[HANG] += 1
                record(HANG, "hang", index, "?", f"no answer within {settings.case_timeout:g} s")
                spawn(index + worker.stride, worker.stride)
        if progress is not None and now - last_progress > 10:
            summary.seconds = now - started
            progress(summary)
            last_progress = now
    summary.seconds = time.monotonic() - started
    return summary


def _store(settings: Settings, corpus: list, finding: Finding) -> Path:
    """Regenerate the failing case, minimise it in a worker (hangs are kept whole), store it; return its dir."""
    base, case = generate(finding.seed, finding.index, corpus)
    digest = hashlib.sha256(case.model_bytes).hexdigest()
    destination = settings.store / slug(finding.signature, digest)
    details = {key: value for key, value in finding.to_dict().items() if key not in ("stored", "count")}
    details["base"] = base
    if finding.status == HANG or finding.signature.startswith("worker-died"):
        write_case(case, destination, {**details, "minimised": False})
        return destination
    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-min-") as scratch:
        original = Path(scratch) / "case"
        write_case(case, original)
        command = [
            sys.executable,
            "-m",
            "fuzz.worker",
            "minimise",
            f"--case={original}",
            f"--out={destination}",
            f"--finding={json.dumps(details)}",
            f"--budget={settings.minimise_budget}",
            f"--memory-mb={settings.memory_mb}",
        ]
        try:
            subprocess.run(
                command,
                cwd=REPO_ROOT,
                timeout=settings.minimise_budget + 60,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except (subprocess.SubprocessError, OSError):
            write_case(case, destination, {**details, "minimised": False})
    return destination
