"""What onnxruntime can really do here: installed distributions, providers, and a probe session per provider.

``onnxruntime`` and ``onnxruntime-gpu`` (and other builds) install the same ``onnxruntime`` module; with two
installed, whichever was installed last wins and CUDA may silently be missing. A provider counts as working
only when a probe session runs and onnxruntime's profiler shows the probe's node executed on that provider.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import warnings
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from bnfold.validate.sessions import CPU, CUDA

ONNXRUNTIME_DISTRIBUTION_PREFIXES = ("onnxruntime", "ort-nightly", "ort_nightly")
PROBED_PACKAGES = ("bnfold", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy", "ml_dtypes", "rich")


@dataclasses.dataclass(frozen=True)
class Distribution:
    name: str
    version: str


@dataclasses.dataclass(frozen=True)
class ProviderProbe:
    """A one-node session on ``provider``: the providers the session got and the one that ran the node."""

    provider: str
    session_providers: tuple[str, ...]
    executed_by: str | None
    error: str | None

    @property
    def works(self) -> bool:
        return self.error is None and self.executed_by == self.provider


@dataclasses.dataclass(frozen=True)
class RuntimeReport:
    versions: dict[str, str | None]
    distributions: tuple[Distribution, ...]
    available_providers: tuple[str, ...]
    probes: tuple[ProviderProbe, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        problems = []
        if len(self.distributions) > 1:
            names = " and ".join(f"{d.name} {d.version}" for d in self.distributions)
            problems.append(
                f"{names} are installed together; they overwrite one another's `onnxruntime` module. "
                "Uninstall all of them, then install exactly one (onnxruntime-gpu for CUDA)"
            )
        if not self.distributions:
            problems.append("no onnxruntime distribution is installed (pip install onnxruntime)")
        for probe in self.probes:
            if probe.works:
                continue
            if probe.provider not in self.available_providers:
                problems.append(f"{probe.provider} is not available in this onnxruntime build")
                continue
            ran = probe.executed_by or ", ".join(probe.session_providers) or "nothing"
            problems.append(f"{probe.provider} is listed as available but the probe ran on {ran}: {probe.error}")
        return tuple(problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": dict(self.versions),
            "distributions": [dataclasses.asdict(d) for d in self.distributions],
            "available_providers": list(self.available_providers),
            "probes": [dataclasses.asdict(p) | {"works": p.works} for p in self.probes],
            "problems": list(self.problems),
        }


def onnxruntime_distributions() -> tuple[Distribution, ...]:
    """Installed distributions that provide the ``onnxruntime`` module (matched by distribution name)."""
    found = {}
    for distribution in metadata.distributions():
        name = (distribution.metadata["Name"] or "").strip()
        if name.lower().startswith(ONNXRUNTIME_DISTRIBUTION_PREFIXES):
            found[name.lower()] = Distribution(name, distribution.version)
    return tuple(sorted(found.values(), key=lambda d: d.name.lower()))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _probe_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="probe_conv")],
        "bnfold_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor("w", onnx.TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 0.0, 0.0, 1.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def probe_provider(provider: str) -> ProviderProbe:
    """Run a one-Conv model on ``provider`` with profiling on and read which provider executed the Conv."""
    with tempfile.TemporaryDirectory(prefix="bnfold-probe-") as directory:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "probe")
        providers: list = [provider] if provider == CPU else [provider, CPU]
        if provider == CUDA:
            providers = [(CUDA, {"use_tf32": "0"}), CPU]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
                session = ort.InferenceSession(_probe_model().SerializeToString(), options, providers=providers)
        except Exception as error:  # any load failure of the provider's libraries
            return ProviderProbe(provider, (), None, " ".join(str(error).split())[:300])
        x = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4)
        try:
            (y,) = session.run(None, {"x": x})
            error = None if np.array_equal(y, x) else "the probe computed a wrong result"
        except Exception as run_error:
            error = " ".join(str(run_error).split())[:300]
        profile = Path(session.end_profiling())
        executed_by = _conv_provider(profile)
        if error is None and executed_by != provider:
            error = "onnxruntime assigned the probe's Conv to another provider"
        return ProviderProbe(provider, tuple(session.get_providers()), executed_by, error)


def _conv_provider(profile: Path) -> str | None:
    try:
        events = json.loads(profile.read_text())
    except (OSError, ValueError):
        return None
    for event in events:
        arguments = event.get("args", {})
        if event.get("cat") == "Node" and arguments.get("op_name") == "Conv" and "provider" in arguments:
            return arguments["provider"]
    return None


def inspect_runtime(providers: Iterable[str] | None = None) -> RuntimeReport:
    """Versions, onnxruntime distributions, available providers and a probe of each (or of ``providers``)."""
    available = tuple(ort.get_available_providers())
    versions = {package: _version(package) for package in PROBED_PACKAGES}
    versions["onnxruntime (module)"] = ort.__version__
    versions["python"] = platform.python_version()
    if providers is None:  # the Azure provider forwards to a remote endpoint: nothing local to probe
        providers = [provider for provider in available if provider != "AzureExecutionProvider"]
    return RuntimeReport(
        versions=versions,
        distributions=onnxruntime_distributions(),
        available_providers=available,
        probes=tuple(probe_provider(provider) for provider in providers),
    )


def cuda_usable() -> tuple[bool, str]:
    """Whether CUDA really executes here, with the reason when it does not (for ``@pytest.mark.cuda`` skips)."""
    if CUDA not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (CPU-only build)"
    probe = probe_provider(CUDA)
    if not probe.works:
        return False, f"CUDAExecutionProvider is listed but a probe session did not run on it: {probe.error}"
    return True, "CUDAExecutionProvider executed the probe"
