"""``verify``: run the original and a candidate model in onnxruntime on the same inputs and compare.

Flow: load both models → check their interfaces → make input batches (generated or loaded) → run the
original on the CPU (the reference) → per requested provider: run the candidate, measure every output, and
(non-CPU) the original's own provider-vs-CPU difference as a noise floor → judge under the tolerance table →
on a mismatch, measure the probed intermediate tensors to name the fold responsible.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime

from bnfold.errors import InvalidModelError, ProviderUnavailableError, UsageError, one_line
from bnfold.validate import inputs as input_batches
from bnfold.validate.inputs import DEFAULT_ITERATIONS
from bnfold.validate.metrics import TensorComparator, TensorMetrics
from bnfold.validate.model_source import ModelInput, ModelSource, load_model_source
from bnfold.validate.report import InputRecord, ProbeMetrics, ProviderRun, Verdict, VerifyReport, judge_run
from bnfold.validate.sessions import CPU, CUDA, make_session, resolve_provider, short_name, unavailable_reason
from bnfold.validate.tolerances import ToleranceTable

Batch = dict[str, np.ndarray]


def verify(
    original: ModelInput,
    candidate: ModelInput,
    *,
    providers: Sequence[str] = ("cpu",),
    seed: int = 0,
    iterations: int = DEFAULT_ITERATIONS,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    tolerances: ToleranceTable | None = None,
    load_inputs: str | os.PathLike | None = None,
    save_inputs: str | os.PathLike | None = None,
    cuda_tf32: bool = False,
    require_provider: bool = False,
    probes: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Compare ``candidate`` against ``original`` (the reference: original on CPU, optimisations off).

    Args:
        original, candidate: paths, ``onnx.ModelProto`` or ``onnx_ir.Model`` with the same inputs/outputs.
        providers: where the candidate runs: ``cpu``, ``cuda`` (any case) or onnxruntime provider names.
        seed, iterations: input generation (ignored for ``load_inputs``, which fixes both).
        input_shapes: ``{input name: shape}``; dims: ``{dim_param: size}``.
        atol, rtol: one number for every floating output, or ``{output name: value}``; they override
            ``tolerances`` (default :class:`ToleranceTable`, keyed by dtype).
        load_inputs, save_inputs: ``.npz`` files of input batches.
        cuda_tf32: allow TF32 on CUDA (deployment reality) instead of measuring the fold alone.
        require_provider: raise :class:`ProviderUnavailableError` instead of skipping a provider.
        probes: ``{intermediate tensor name: label}`` present in both models (a folded BN's output tensor →
            the BN node name); measured after a mismatch to name the first divergent fold. ``None`` (default)
            probes every BatchNormalization output of the original that the candidate also produces;
            ``{}`` probes nothing.

    Raises:
        InvalidModelError: a model cannot be read or the original cannot be loaded by onnxruntime.
        UsageError: bad options, inputs that cannot be generated or loaded, or the original fails to run.
        ProviderUnavailableError: ``require_provider`` and a provider is not really available.
    """
    started = time.perf_counter()
    requested = _resolve_providers(providers)
    table = ToleranceTable.with_overrides(atol, rtol, base=tolerances)
    reference_model = load_model_source(original)
    candidate_model = load_model_source(candidate)
    unavailable = {provider: unavailable_reason(provider) for provider in requested}
    if require_provider:
        for reason in unavailable.values():
            if reason is not None:
                raise ProviderUnavailableError(reason)

    specs = input_batches.input_specs(reference_model.proto)
    probes = dict(batch_norm_probes(reference_model, candidate_model) if probes is None else probes)
    unknown = table.unknown_outputs(set(reference_model.output_names()) | set(probes))
    if unknown:
        raise UsageError(
            f"tolerance given for unknown output(s) {', '.join(unknown)} "
            f"(outputs: {', '.join(reference_model.output_names())})"
        )
    batches, source = _input_batches(specs, seed, iterations, input_shapes, dims, load_inputs)
    if save_inputs is not None:
        input_batches.save_inputs(save_inputs, batches)
    problems = _interface_problems(reference_model, candidate_model)
    reference_outputs = _run_reference(reference_model, batches)

    runs: list[ProviderRun] = []
    if not problems:
        for provider in requested:
            provider_started = time.perf_counter()
            if unavailable[provider] is not None:
                runs.append(ProviderRun(short_name(provider), provider, skipped_reason=unavailable[provider]))
                continue
            run = _measure_provider(
                reference_model, candidate_model, provider, batches, reference_outputs, cuda_tf32, require_provider
            )
            if probes and judge_run(run, table).verdict is Verdict.FAILED and run.run_error is None:
                run = _with_probes(run, reference_model, candidate_model, batches, probes, cuda_tf32)
            runs.append(dataclasses.replace(run, elapsed_s=round(time.perf_counter() - provider_started, 4)))

    return VerifyReport.judged(
        original=reference_model.label,
        candidate=candidate_model.label,
        seed=seed if source == "generated" else None,
        iterations=len(batches),
        inputs=tuple(
            InputRecord(spec.name, spec.dtype, tuple(tuple(b[spec.name].shape) for b in batches), source)
            for spec in specs
        ),
        problems=tuple(problems),
        outputs=reference_model.output_names(),
        runs=tuple(runs),
        tolerances=table,
        versions=_versions(),
        elapsed_s=time.perf_counter() - started,
    )


def batch_norm_probes(original: ModelSource, candidate: ModelSource) -> dict[str, str]:
    """``{BN output tensor: BN node name}`` for every main-graph BatchNormalization of ``original`` whose
    output tensor the candidate also produces (folded producers keep the BN's output name)."""
    produced = set(candidate.node_outputs())
    probes = {}
    for index, node in enumerate(original.proto.graph.node):
        is_batch_norm = node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
        if is_batch_norm and node.output and node.output[0] in produced:
            probes[node.output[0]] = node.name or f"BatchNormalization #{index}"
    return probes


def _resolve_providers(providers: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(providers, str):
        providers = [part for part in providers.split(",") if part.strip()]
    resolved = tuple(dict.fromkeys(resolve_provider(name) for name in providers))
    if not resolved:
        raise UsageError("no provider requested (use --providers cpu,cuda)")
    return resolved


def _input_batches(
    specs: Sequence[input_batches.InputSpec],
    seed: int,
    iterations: int,
    input_shapes: Mapping[str, Sequence[int]] | None,
    dims: Mapping[str, int] | None,
    load_inputs: str | os.PathLike | None,
) -> tuple[list[Batch], str]:
    for spec in specs:
        if spec.dtype.startswith("non-tensor"):
            raise UsageError(f"input {spec.name!r} is a {spec.dtype} value; bnfold verifies tensor inputs only")
    if load_inputs is not None:
        if input_shapes or dims:
            raise UsageError("--input-shapes and --dim do not apply to --load-inputs (the file fixes the shapes)")
        return input_batches.load_inputs(load_inputs, specs), "loaded"
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}")
    batches = input_batches.generate_inputs(
        specs, seed=seed, iterations=iterations, input_shapes=input_shapes, dims=dims
    )
    return batches, "generated"


def _interface_problems(reference: ModelSource, candidate: ModelSource) -> list[str]:
    """Differences in fed inputs (name and element type) and in output names."""
    problems = []
    reference_inputs = {spec.name: spec.dtype for spec in input_batches.input_specs(reference.proto)}
    candidate_inputs = {spec.name: spec.dtype for spec in input_batches.input_specs(candidate.proto)}
    if missing := sorted(set(reference_inputs) - set(candidate_inputs)):
        problems.append(f"the candidate lacks input(s) {', '.join(missing)}")
    if extra := sorted(set(candidate_inputs) - set(reference_inputs)):
        problems.append(f"the candidate needs extra input(s) {', '.join(extra)}")
    for name in sorted(set(reference_inputs) & set(candidate_inputs)):
        if reference_inputs[name] != candidate_inputs[name]:
            problems.append(
                f"input {name!r} is {candidate_inputs[name]} in the candidate, {reference_inputs[name]} in the original"
            )
    if extra := sorted(set(candidate.output_names()) - set(reference.output_names())):
        problems.append(f"the candidate has extra output(s) {', '.join(extra)}")
    return problems


def _run_reference(model: ModelSource, batches: Sequence[Batch]) -> list[dict[str, np.ndarray]]:
    try:
        session = make_session(model, CPU)
    except Exception as error:  # onnxruntime raises several exception types
        raise InvalidModelError(f"{model.label}: onnxruntime cannot load the original: {one_line(error)}") from error
    outputs = []
    for iteration, batch in enumerate(batches):
        try:
            outputs.append(session.run(batch))
        except UsageError:
            raise
        except Exception as error:
            shapes = ", ".join(f"{name}{list(array.shape)}" for name, array in batch.items())
            raise UsageError(
                f"the original model fails on the inputs of iteration {iteration} ({shapes}): {one_line(error)}; "
                "give shapes with --input-shapes NAME:D0,D1,... or --dim NAME=SIZE, or inputs with --load-inputs"
            ) from error
    return outputs


def _measure_provider(
    reference_model: ModelSource,
    candidate_model: ModelSource,
    provider: str,
    batches: Sequence[Batch],
    reference_outputs: Sequence[Mapping[str, np.ndarray]],
    cuda_tf32: bool,
    require_provider: bool,
) -> ProviderRun:
    tf32 = cuda_tf32 if provider == CUDA else None
    base = ProviderRun(short_name(provider), provider, cuda_tf32=tf32)
    try:
        session = make_session(candidate_model, provider, cuda_tf32=cuda_tf32)
    except Exception as error:
        if provider != CPU:  # a provider whose libraries fail to load is absent, not a fold failure
            return _unavailable(base, f"{provider} could not start: {one_line(error)}", require_provider)
        return dataclasses.replace(base, run_error=f"onnxruntime cannot load the candidate: {one_line(error)}")
    if not session.really_runs_on_requested:
        reason = f"{provider} was requested but the session runs on {', '.join(session.executed_providers)}"
        return _unavailable(base, reason, require_provider)
    base = dataclasses.replace(base, executed_providers=session.executed_providers)
    output_names = reference_model.output_names()
    candidate_names = set(candidate_model.output_names())
    try:
        candidate_outputs = [session.run(batch, [n for n in output_names if n in candidate_names]) for batch in batches]
    except UsageError:
        raise
    except Exception as error:
        return dataclasses.replace(base, run_error=one_line(error))
    run = dataclasses.replace(base, outputs=_compare(output_names, reference_outputs, candidate_outputs))
    if provider != CPU:
        run = dataclasses.replace(
            run, noise_floor=_noise_floor(reference_model, provider, batches, reference_outputs, cuda_tf32)
        )
    return run


def _unavailable(base: ProviderRun, reason: str, require_provider: bool) -> ProviderRun:
    if require_provider:
        raise ProviderUnavailableError(reason)
    return dataclasses.replace(base, skipped_reason=reason)


def _compare(
    names: Iterable[str],
    reference_outputs: Sequence[Mapping[str, np.ndarray]],
    candidate_outputs: Sequence[Mapping[str, np.ndarray]],
) -> tuple[TensorMetrics, ...]:
    results = []
    for name in names:
        comparator = TensorComparator(name)
        for reference, candidate in zip(reference_outputs, candidate_outputs, strict=True):
            comparator.add(reference[name], candidate.get(name))
        results.append(comparator.result())
    return tuple(results)


def _noise_floor(
    model: ModelSource,
    provider: str,
    batches: Sequence[Batch],
    reference_outputs: Sequence[Mapping[str, np.ndarray]],
    cuda_tf32: bool,
) -> tuple[TensorMetrics, ...]:
    """The original on ``provider`` vs the original on the CPU: what the provider alone changes."""
    try:
        session = make_session(model, provider, cuda_tf32=cuda_tf32)
        outputs = [session.run(batch) for batch in batches]
    except Exception:  # the noise floor is informative only; the candidate's run decides
        return ()
    return _compare(model.output_names(), reference_outputs, outputs)


def _with_probes(
    run: ProviderRun,
    reference_model: ModelSource,
    candidate_model: ModelSource,
    batches: Sequence[Batch],
    probes: Mapping[str, str],
    cuda_tf32: bool,
) -> ProviderRun:
    """Measure each probed tensor (original on CPU vs candidate on the run's provider)."""
    reference_order = reference_model.node_outputs()
    candidate_tensors = set(candidate_model.node_outputs()) | set(candidate_model.output_names())
    present = tuple(name for name in probes if name in reference_order and name in candidate_tensors)
    absent = [name for name in probes if name not in present]
    note = f"not in both main graphs, not measured: {', '.join(absent)}" if absent else None
    if not present:
        return dataclasses.replace(run, probe_note=note or "no probes")
    try:
        reference_session = make_session(reference_model.with_extra_outputs(present), CPU)
        candidate_session = make_session(candidate_model.with_extra_outputs(present), run.provider, cuda_tf32=cuda_tf32)
        references = [reference_session.run(batch, present) for batch in batches]
        candidates = [candidate_session.run(batch, present) for batch in batches]
    except Exception as error:
        return dataclasses.replace(run, probe_note=f"probes could not be measured: {one_line(error)}")
    measured = _compare(present, references, candidates)
    probe_metrics = tuple(
        ProbeMetrics(label=probes[name], order=reference_order[name], metrics=metrics)
        for name, metrics in zip(present, measured, strict=True)
    )
    return dataclasses.replace(run, probes=probe_metrics, probe_note=note)


def _versions() -> dict[str, str]:
    from bnfold import __version__  # the package imports lazily; at module level this would be circular

    return {
        "bnfold": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
