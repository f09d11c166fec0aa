"""A clear error when a command needs onnxruntime and none is installed.

bnfold installs without a runtime (folding needs none); the extras bring exactly one:
``pip install "bnfold[cpu]"`` (``onnxruntime``) or ``pip install "bnfold[gpu]"`` (``onnxruntime-gpu``). Both
distributions install the same ``onnxruntime`` Python module, so they must never be installed together (the
last one installed wins; ``bnfold doctor`` reports the clash, see :mod:`bnfold.validate.environment`).

This module never imports onnxruntime: it only asks whether the module can be found, which costs no import
time. The CLI calls :func:`require_onnxruntime` before it reads or writes anything.
"""

from __future__ import annotations

import importlib.util

from bnfold.errors import RuntimeMissingError

INSTALL_HINT = 'pip install "bnfold[cpu]" (onnxruntime) or "bnfold[gpu]" (onnxruntime-gpu, CUDA)'


def require_onnxruntime(purpose: str, alternative: str | None = None) -> None:
    """Raise :class:`~bnfold.errors.RuntimeMissingError` (exit 5) when the ``onnxruntime`` module cannot be found.

    ``purpose`` starts the sentence "… needs onnxruntime" (e.g. ``"verification"``); ``alternative`` names a way
    around it (e.g. ``"pass --no-verify to fold without verifying"``).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        message = f"{purpose} needs onnxruntime, which is not installed: {INSTALL_HINT}"
        raise RuntimeMissingError(message + (f"; or {alternative}" if alternative else ""))
