"""onnxruntime sessions for verification: providers by short name, optimisations off, the provider that really ran.

Every session runs with ``GraphOptimizationLevel.ORT_DISABLE_ALL``: at any other level onnxruntime folds
Conv+BatchNormalization itself, and the check would compare one fold against another.

A requested provider counts as present only when onnxruntime lists it as available *and* a session created
for it reports it in ``session.get_providers()`` (onnxruntime silently falls back to the CPU otherwise).
CUDA sessions disable TF32 (``use_tf32=0``) unless asked: TF32 convolutions add ~1e-3 relative error that
says nothing about the fold.
"""

from __future__ import annotations

import ctypes
import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import UsageError
from bnfold.validate.model_source import ModelSource

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def resolve_provider(name: str) -> str:
    """``cpu``/``cuda`` (any case) or a full execution provider name → the onnxruntime provider name."""
    key = name.strip().lower()
    if key in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key]
    for provider in ort.get_all_providers():
        if provider.lower() in (key, key + "executionprovider"):
            return provider
    raise UsageError(f"unknown provider {name!r} (use cpu or cuda, or an onnxruntime execution provider name)")


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` → ``cuda``."""
    return provider.removesuffix("ExecutionProvider").lower()


def unavailable_reason(provider: str) -> str | None:
    """Why ``provider`` cannot run here, or ``None`` when onnxruntime lists it as available."""
    available = ort.get_available_providers()
    if provider in available:
        return None
    hint = " (install onnxruntime-gpu instead of onnxruntime: see `bnfold doctor`)" if provider == CUDA else ""
    return f"{provider} is not available in this onnxruntime (available: {', '.join(available)}){hint}"


@dataclasses.dataclass(frozen=True)
class Session:
    """An inference session and what it was asked for."""

    inner: ort.InferenceSession
    requested: str

    @property
    def executed_providers(self) -> tuple[str, ...]:
        return tuple(self.inner.get_providers())

    @property
    def really_runs_on_requested(self) -> bool:
        return self.requested in self.executed_providers

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; returns ``{output name: array}``.

        onnxruntime's numpy bridge lacks bfloat16, so models with bfloat16 inputs or outputs run through
        OrtValues (bfloat16 arrays travel as their uint16 bit patterns).
        """
        names = list(output_names) if output_names is not None else [o.name for o in self.inner.get_outputs()]
        bfloat16_outputs = any(o.type == "tensor(bfloat16)" for o in self.inner.get_outputs() if o.name in names)
        if not bfloat16_outputs and not any(array.dtype == ml_dtypes.bfloat16 for array in feeds.values()):
            outputs = self.inner.run(names, dict(feeds))
            return {name: _checked_tensor(name, value) for name, value in zip(names, outputs, strict=True)}
        ort_feeds = {name: _to_ort_value(array) for name, array in feeds.items()}
        outputs = self.inner.run_with_ort_values(names, ort_feeds)
        return {name: _to_numpy(name, value) for name, value in zip(names, outputs, strict=True)}


def make_session(model: ModelSource, provider: str, *, cuda_tf32: bool = False) -> Session:
    """A session for ``model`` on ``provider`` (CPU kept as fallback for ops the provider lacks).

    Raises whatever onnxruntime raises when the model cannot be loaded; callers decide what it means.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # fatal only: errors surface as exceptions, fallbacks via get_providers()
    if model.external_data_dir is not None:
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER_KEY, str(model.external_data_dir))
    providers: list = [CPU]
    if provider == CUDA:
        providers = [(CUDA, {"use_tf32": "1" if cuda_tf32 else "0"}), CPU]
    elif provider != CPU:
        providers = [provider, CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
        inner = ort.InferenceSession(model.proto.SerializeToString(), options, providers=providers)
    return Session(inner=inner, requested=provider)


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _checked_tensor(name: str, value: object) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UsageError(f"output {name!r} is not a tensor ({type(value).__name__}); bnfold compares tensors only")
    return value


def _to_numpy(name: str, value: ort.OrtValue) -> np.ndarray:
    if not value.is_tensor():
        raise UsageError(f"output {name!r} is not a tensor ({value.data_type()}); bnfold compares tensors only")
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    # onnxruntime's numpy bridge lacks bfloat16: copy the raw bits from the (CPU) output buffer.
    if value.device_name().lower() != "cpu":
        raise UsageError(f"output {name!r}: bfloat16 outputs on {value.device_name()} memory are not supported")
    size = value.tensor_size_in_bytes()
    raw = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(value.shape()).copy()
