"""Files: loading models (checks, lazy wire-level reads), input data, the output plan, atomic staged writes.

Modules, lowest first: :mod:`~bnfold.files.paths` (path identity, output names), :mod:`~bnfold.files.wire`
(protobuf wire format), :mod:`~bnfold.files.checks` (what a model must satisfy before anything reads it),
:mod:`~bnfold.files.inputs` (``--data``/``--load-inputs`` files), :mod:`~bnfold.files.load`,
:mod:`~bnfold.files.output_plan` (every path a command writes, checked before the first write),
:mod:`~bnfold.files.writer` (threaded writer, data file), :mod:`~bnfold.files.serialize` (model → file without
one whole protobuf), :mod:`~bnfold.files.staging` (write beside the destination, commit by rename). This
package knows nothing of folding or verification (:mod:`bnfold.workflow` puts them together).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names → their module (imported on first use, so that importing one module does not import them all).
_LAZY = {
    "open_regular_file": "bnfold.files.inputs",
    "read_npz": "bnfold.files.inputs",
    "require_regular_file": "bnfold.files.inputs",
    "OutputPlan": "bnfold.files.output_plan",
    "SOURCE_FILES_META": "bnfold.files.load",
    "as_model": "bnfold.files.load",
    "external_files": "bnfold.files.load",
    "files_size_bytes": "bnfold.files.load",
    "load_model": "bnfold.files.load",
    "open_lazily": "bnfold.files.load",
    "external_data_name": "bnfold.files.paths",
    "is_same_file": "bnfold.files.paths",
    "StagedModel": "bnfold.files.staging",
    "save_model": "bnfold.files.staging",
    "stage_model": "bnfold.files.staging",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold.files' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
