"""Run one fuzz case through load → fold → save and classify what happened.

The contract under test (issue 8):

- bnfold raises nothing but :class:`~bnfold.errors.BnfoldError` subclasses (``rejected``); anything else is a
  ``crash`` (MemoryError and RecursionError included);
- when the input passes ``onnx.checker.check_model``, the written output passes it too (else ``checker``),
  and bnfold can load its own output again (else ``reload``);
- the input files are byte-for-byte unchanged afterwards (else ``input_modified``).

A hang is detected by the runner (:mod:`fuzz.runner`), which watches every case with a timeout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
import traceback
import warnings
from pathlib import Path

import onnx

from bnfold import api, files
from bnfold.errors import BnfoldError
from bnfold.workflow import stage_fold
from fuzz.seeds import Case

OK = "ok"
REJECTED = "rejected"
CRASH = "crash"
CHECKER = "checker"
RELOAD = "reload"
INPUT_MODIFIED = "input_modified"
HANG = "hang"
FAILURES = frozenset({CRASH, CHECKER, RELOAD, INPUT_MODIFIED, HANG})

_OUR_DIRECTORIES = ("bnfold", "passes")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one case did. ``signature`` identifies a failure class (stable across line-number edits)."""

    status: str
    stage: str = ""
    error_type: str = ""
    message: str = ""
    signature: str = ""
    traceback: str = ""
    input_valid: bool | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``directory`` (symlinks are recorded by target, not followed)."""
    digests = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_symlink():
            digests[relative] = "link:" + str(path.readlink())
        elif path.is_file():
            digests[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def checker_passes(path: Path) -> bool:
    """Whether ``onnx.checker.check_model`` accepts the model file (external data resolved beside it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx.checker.check_model(str(path))
    except Exception:
        return False
    return True


def failure_signature(stage: str, error: BaseException) -> str:
    """``stage:ExceptionType:innermost bnfold frame:innermost frame``, without line numbers or values.

    ``stage`` is the pipeline (``api``, ``streaming``) or a check after it (``checker``, ``reload``).
    """
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if any(f"/{d}/" in f.filename for d in _OUR_DIRECTORIES) and "/fuzz/" not in f.filename]
    innermost = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "-"
    if ours:
        return f"{stage}:{type(error).__name__}:{Path(ours[-1].filename).name}:{ours[-1].name}:{innermost}"
    words = re.findall(r"[A-Za-z]+", str(error))[:8]  # outside bnfold (the checker): the message tells classes apart
    return f"{stage}:{type(error).__name__}:{'-'.join(words)}:{innermost}"


def _failure(status: str, stage: str, error: BaseException, input_valid: bool | None) -> Outcome:
    return Outcome(
        status=status,
        stage=stage,
        error_type=type(error).__name__,
        message=str(error)[:500],
        signature=failure_signature(stage, error),
        traceback="".join(traceback.format_exception(error))[-4000:],
        input_valid=input_valid,
    )


# The ways a model goes through bnfold: the Python API, the streaming fold the CLI uses, the API with
# ``lower_standalone=True``, and ``lower_training`` (the ``lower-training`` subcommand).
API = "api"
STREAMING = "streaming"
LOWER_STANDALONE = "lower_standalone"
LOWER_TRAINING = "lower_training"
PIPELINES = (API, STREAMING, LOWER_STANDALONE, LOWER_TRAINING)


# Thresholds that make every non-empty fuzz-sized file take the CLI's wire-level lazy loader (16 MiB / 64 KiB
# by default; an empty file is below any real threshold and goes to ``files.load_model``, as in production).
SMALL_STREAMING_THRESHOLDS = {"LAZY_FILE_BYTES": 1, "LAZY_TENSOR_BYTES": 16}


def use_small_streaming_thresholds() -> None:
    """Set :data:`SMALL_STREAMING_THRESHOLDS` in ``bnfold.files.load`` (for a whole worker process)."""
    from bnfold.files import load

    for name, value in SMALL_STREAMING_THRESHOLDS.items():
        setattr(load, name, value)


def _fold_and_save(source: Path, output: Path, pipeline: str) -> None:
    """load → fold → save ``source`` to ``output`` the way ``pipeline`` does it."""
    if pipeline == STREAMING:
        folded = stage_fold(source, output)
        with folded.staged as staged:
            staged.commit()
        return
    model = files.load_model(source)
    if pipeline == LOWER_TRAINING:
        from bnfold.training import lower_training

        lowered, _count = lower_training(model)
        files.save_model(lowered, output)
        return
    folded_model, _report = api.fold(model, lower_standalone=pipeline == LOWER_STANDALONE)
    files.save_model(folded_model, output)


def run_case(case: Case, scratch: Path | None = None, pipeline: str = API) -> Outcome:
    """Write ``case`` into a fresh directory, run load → fold → save → checker → reload, and classify."""
    root = Path(tempfile.mkdtemp(prefix="bnfold-fuzz-", dir=scratch))
    try:
        return _run_in(case, root, pipeline)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_in(case: Case, root: Path, pipeline: str) -> Outcome:
    source_dir, output_dir = root / "in", root / "out"
    source_dir.mkdir()
    output_dir.mkdir()
    source = case.write(source_dir)
    before = _digest(source_dir)
    input_valid = checker_passes(source)
    output = output_dir / "folded.onnx"
    stage = pipeline
    try:
        _fold_and_save(source, output, pipeline)
    except BnfoldError as error:
        outcome = Outcome(REJECTED, stage, type(error).__name__, str(error)[:500], input_valid=input_valid)
    except Exception as error:  # MemoryError and RecursionError included
        return _failure(CRASH, stage, error, input_valid)
    else:
        outcome = Outcome(OK, "done", input_valid=input_valid)
        if input_valid and not checker_passes(output):
            try:
                onnx.checker.check_model(str(output))
            except Exception as error:
                return _failure(CHECKER, "checker", error, input_valid)
        try:
            files.load_model(output)
        except Exception as error:
            return _failure(RELOAD, "reload", error, input_valid)
    if _digest(source_dir) != before:
        return Outcome(INPUT_MODIFIED, stage, signature=f"{stage}:input_modified", input_valid=input_valid)
    return outcome
