"""``verify``: run the original and a candidate model in onnxruntime on the same inputs and compare.

Flow: load both models → check their interfaces → make input batches (generated or loaded) → run the
original on the CPU (the reference) → per requested provider: run the candidate, measure every output, and
(non-CPU) the original's own provider-vs-CPU difference as a noise floor, and the probed intermediate tensors
(each fold's output: a wrong fold the rest of the network attenuates still shows there, and the first
divergent one names the fold responsible, with every fold that wrote the same layer) → judge under the
tolerance table → on a mismatch of values alone, or whenever an output or probe is float16/bfloat16 (the
table cannot tell a bug from rounding there), and no explicit atol/rtol, evaluate the original in float64 once
(:mod:`bnfold.validate.float64_reference`) and measure the original's and the candidate's distance to it,
for the outputs and the probes: the report is then judged by the float64 rule
(:class:`~bnfold.validate.tolerances.Float64Rule`). When the plain comparison passes on float32/float64
tensors, nothing more runs.

``timeout_s`` bounds the whole verification (checked between iterations: :class:`VerificationTimeout`);
``progress`` is called after every iteration of every stage, for the CLI to show.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime

from bnfold.errors import BnfoldError, ExitCode, InvalidModelError, ProviderUnavailableError, UsageError, one_line
from bnfold.validate import float64_reference, local_folds
from bnfold.validate import inputs as input_batches
from bnfold.validate.float64_reference import DEFAULT_LIMITS, Float64Limits
from bnfold.validate.inputs import DEFAULT_ITERATIONS
from bnfold.validate.metrics import TensorComparator, TensorMetrics
from bnfold.validate.model_source import ModelInput, ModelSource, load_model_source
from bnfold.validate.report import (
    Float64Check,
    InputRecord,
    ProbeMetrics,
    ProviderRun,
    TruthMetrics,
    VerifyReport,
    float64_applies,
    judge_run,
)
from bnfold.validate.sessions import CPU, CUDA, make_session, resolve_provider, short_name, unavailable_reason
from bnfold.validate.tolerances import ToleranceTable

Batch = dict[str, np.ndarray]
Outputs = list[dict[str, np.ndarray]]
#: ``progress(stage, done, total)``: called after each iteration of each stage (e.g. ``"cpu: candidate"``).
Progress = Callable[[str, int, int], None]


class VerificationTimeout(BnfoldError):
    """The verification ran past its ``timeout_s``: nothing was judged (exit code 1, as a failed verification)."""

    exit_code = ExitCode.FAILED


class _Clock:
    """The verification's deadline and progress reporting, checked between iterations."""

    def __init__(self, timeout_s: float | None, progress: Progress | None) -> None:
        if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
            raise UsageError(f"timeout must be a number of seconds > 0, got {timeout_s!r}")
        self.started = time.perf_counter()
        self.timeout_s = timeout_s
        self.progress = progress

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)
        if self.timeout_s is not None and time.perf_counter() - self.started > self.timeout_s:
            raise VerificationTimeout(
                f"verification timed out after {self.timeout_s:g} s (during {stage}, iteration {done} of {total})"
            )


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
    float64: bool = True,
    float64_limits: Float64Limits = DEFAULT_LIMITS,
    timeout_s: float | None = None,
    progress: Progress | None = None,
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
            the BN node name); measured on every run: a probe beyond tolerance fails the verification (a
            wrong fold the network attenuates) and the first divergent one is named responsible. ``None`` (default)
            probes every BatchNormalization output of the original that the candidate also produces;
            ``{}`` probes nothing.
        float64: after a mismatch of values alone, and always for float16/bfloat16 outputs or probes, judge
            against the original evaluated in float64 (ignored when atol/rtol are given: an explicit bound is
            fixed); ``float64_limits`` bounds that run.
        timeout_s: give up (:class:`VerificationTimeout`) once this many seconds have passed.
        progress: ``progress(stage, done, total)`` after each iteration of each stage.

    Raises:
        InvalidModelError: a model cannot be read, or onnxruntime cannot load the original or run it on
            floating inputs of the fixed shapes it declares.
        UsageError: bad options, inputs that cannot be generated or loaded, or the original fails to run on
            shapes or values that were chosen or given (a hint says how to give others).
        ProviderUnavailableError: ``require_provider`` and a provider is not really available.
        VerificationTimeout: ``timeout_s`` passed.
    """
    started = time.perf_counter()
    clock = _Clock(timeout_s, progress)
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
    reference_outputs = _run_reference(reference_model, specs, batches, clock)
    truth = _Float64Truth(reference_model, batches, float64_limits, clock)

    runs: list[ProviderRun] = []
    if not problems:
        for provider in requested:
            provider_started = time.perf_counter()
            if unavailable[provider] is not None:
                runs.append(ProviderRun(short_name(provider), provider, skipped_reason=unavailable[provider]))
                continue
            run, candidate_outputs = _measure_provider(
                reference_model,
                candidate_model,
                provider,
                batches,
                reference_outputs,
                cuda_tf32,
                require_provider,
                clock,
            )
            probed = None
            if probes and run.run_error is None:  # always: a bug the network attenuates still shows at its fold
                run, probed = _with_probes(run, reference_model, candidate_model, batches, probes, cuda_tf32, clock)
            float32_verdict = judge_run(run, table)
            decide_float64 = float64 and float64_applies(run, float32_verdict, table)
            if probed is not None and (decide_float64 or float32_verdict.divergent):
                run, probed = _with_fold_spans(run, probed, reference_model, candidate_model)
            if decide_float64:
                check = truth.check(reference_outputs, candidate_model, candidate_outputs, probed, provider, cuda_tf32)
                run = dataclasses.replace(run, float64=check)
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


def _run_reference(
    model: ModelSource, specs: Sequence[input_batches.InputSpec], batches: Sequence[Batch], clock: _Clock
) -> Outputs:
    """The original's outputs on the CPU (the reference).

    Its failures are the model's (:class:`InvalidModelError`, exit 3) when onnxruntime cannot create a session
    for it, or when it fails on floating inputs of exactly the shapes it declares (every dim fixed): nothing
    about such inputs can be wrong. Any other run failure may be the inputs' (a dynamic dim bnfold picked,
    shapes or integer values given or generated): a :class:`UsageError` (exit 2) saying how to give others.
    """
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
            if _declared_inputs(specs, batch):
                raise InvalidModelError(
                    f"{model.label}: the original model fails in onnxruntime on floating inputs of the fixed "
                    f"shapes it declares ({shapes}): {one_line(error)}"
                ) from error
            raise UsageError(
                f"the original model fails on the inputs of iteration {iteration} ({shapes}): {one_line(error)}; "
                "give shapes with --input-shapes NAME:D0,D1,... or --dim NAME=SIZE, or inputs with --load-inputs"
            ) from error
        clock.tick("original (cpu)", iteration + 1, len(batches))
    return outputs


def _declared_inputs(specs: Sequence[input_batches.InputSpec], batch: Batch) -> bool:
    """Whether ``batch`` is floating inputs of exactly the fixed shapes the model declares (no dim was chosen)."""
    for spec in specs:
        array = batch.get(spec.name)
        fixed = spec.dims is not None and all(isinstance(dim, int) for dim in spec.dims)
        if array is None or array.dtype.kind != "f" or not fixed or tuple(array.shape) != tuple(spec.dims):
            return False
    return True


def _measure_provider(
    reference_model: ModelSource,
    candidate_model: ModelSource,
    provider: str,
    batches: Sequence[Batch],
    reference_outputs: Sequence[Mapping[str, np.ndarray]],
    cuda_tf32: bool,
    require_provider: bool,
    clock: _Clock,
) -> tuple[ProviderRun, Outputs]:
    """The candidate's measurements on ``provider``, and its outputs (kept for the float64 step)."""
    tf32 = cuda_tf32 if provider == CUDA else None
    base = ProviderRun(short_name(provider), provider, cuda_tf32=tf32)
    try:
        session = make_session(candidate_model, provider, cuda_tf32=cuda_tf32)
    except Exception as error:
        if provider != CPU:  # a provider whose libraries fail to load is absent, not a fold failure
            return _unavailable(base, f"{provider} could not start: {one_line(error)}", require_provider), []
        return dataclasses.replace(base, run_error=f"onnxruntime cannot load the candidate: {one_line(error)}"), []
    if not session.really_runs_on_requested:
        reason = f"{provider} was requested but the session runs on {', '.join(session.executed_providers)}"
        return _unavailable(base, reason, require_provider), []
    base = dataclasses.replace(base, executed_providers=session.executed_providers)
    output_names = reference_model.output_names()
    candidate_names = set(candidate_model.output_names())
    candidate_outputs: Outputs = []
    try:
        for iteration, batch in enumerate(batches):
            candidate_outputs.append(session.run(batch, [n for n in output_names if n in candidate_names]))
            clock.tick(f"{short_name(provider)}: candidate", iteration + 1, len(batches))
    except (UsageError, VerificationTimeout):
        raise
    except Exception as error:
        return dataclasses.replace(base, run_error=one_line(error)), []
    run = dataclasses.replace(base, outputs=_compare(output_names, reference_outputs, candidate_outputs))
    if provider != CPU:
        run = dataclasses.replace(
            run, noise_floor=_noise_floor(reference_model, provider, batches, reference_outputs, cuda_tf32)
        )
    return run, candidate_outputs


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
    clock: _Clock,
) -> tuple[ProviderRun, _Probed | None]:
    """Measure each probed tensor (original on CPU vs candidate on the run's provider); also return what the
    float64 stage needs to know of them (names, labels, order, element types; not the arrays)."""
    reference_order = reference_model.node_outputs()
    candidate_tensors = set(candidate_model.node_outputs()) | set(candidate_model.output_names())
    present = tuple(name for name in probes if name in reference_order and name in candidate_tensors)
    absent = [name for name in probes if name not in present]
    note = f"not in both main graphs, not measured: {', '.join(absent)}" if absent else None
    if not present:
        return dataclasses.replace(run, probe_note=note or "no probes"), None
    references: Outputs = []
    candidates: Outputs = []
    try:
        reference_session = make_session(reference_model.with_extra_outputs(present), CPU)
        candidate_session = make_session(candidate_model.with_extra_outputs(present), run.provider, cuda_tf32=cuda_tf32)
        for iteration, batch in enumerate(batches):
            references.append(reference_session.run(batch, present))
            candidates.append(candidate_session.run(batch, present))
            clock.tick(f"{run.requested}: probes", iteration + 1, len(batches))
    except VerificationTimeout:
        raise
    except Exception as error:
        return dataclasses.replace(run, probe_note=f"probes could not be measured: {one_line(error)}"), None
    measured = _compare(present, references, candidates)
    probe_metrics = tuple(
        ProbeMetrics(label=probes[name], order=reference_order[name], metrics=metrics)
        for name, metrics in zip(present, measured, strict=True)
    )
    probed = _Probed({name: (probes[name], reference_order[name], _dtype(references[0][name])) for name in present})
    return dataclasses.replace(run, probes=probe_metrics, probe_note=note), probed


@dataclasses.dataclass(frozen=True)
class _Probed:
    """The probed tensors that both models produce: ``names`` maps each to ``(label, order, element type)``;
    ``folds`` each to the folds that wrote its layers (:func:`_with_fold_spans`). (Their arrays are not kept:
    the float64 stage re-runs each fold on its own.)"""

    names: Mapping[str, tuple[str, int, str]]
    folds: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _with_fold_spans(
    run: ProviderRun, probed: _Probed, reference_model: ModelSource, candidate_model: ModelSource
) -> tuple[ProviderRun, _Probed]:
    """Name, for each probe, every fold of the original between it and where its fold begins
    (:func:`local_folds.folds_between`): a forward fold and a backward fold into one weight are measured at one
    probe, and a divergence there must blame both. Done only when a probe may be blamed (a graph walk, but
    comparing constants costs time on big models)."""
    labels = {name: label for name, (label, _, _) in probed.names.items()}
    shared = local_folds.shared_tensors(candidate_model, reference_model, probed.names)
    folds = {}
    for name in probed.names:
        inputs = local_folds.fold_inputs(candidate_model, name, shared)
        if inputs is not None:
            folds[name] = local_folds.folds_between(reference_model, inputs, name, labels)
    probes = tuple(dataclasses.replace(probe, folds=folds.get(probe.metrics.name, ())) for probe in run.probes)
    return dataclasses.replace(run, probes=probes), dataclasses.replace(probed, folds=folds)


class _Float64Truth:
    """The float64 side of a verification, run only after a mismatch of values alone.

    - Outputs: the whole original evaluated in float64, at most once per verification (shared by every
      provider): the original's and the candidate's distance to it.
    - Probed folds: each fold cut out of both models (:mod:`bnfold.validate.local_folds`) and fed the
      original's own float32 value of its input on the first batch, rescaled to unit RMS
      (:func:`_unit_scale`; a fold is an identity, so one batch of many positions tests it); the cut-out
      original is also evaluated in float64. A fold that cannot be cut out is left out of the float64
      verdict's attribution and named in the note (``TruthMetrics.scope``).
    """

    def __init__(self, model: ModelSource, batches: Sequence[Batch], limits: Float64Limits, clock: _Clock) -> None:
        self.model, self.batches, self.limits, self.clock = model, batches, limits, clock
        self.started: float | None = None
        self._outputs: tuple[Float64Check, Outputs] | None = None

    def _spent(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def check(
        self,
        reference_outputs: Outputs,
        candidate_model: ModelSource,
        candidate_outputs: Outputs,
        probed: _Probed | None,
        provider: str,
        cuda_tf32: bool,
    ) -> Float64Check:
        """Distances to the float64 truth of the original (float32, CPU) and the candidate: outputs, folds."""
        if self.started is None:
            self.started = time.perf_counter()
        base, truth = self._whole_model()
        if base.unavailable is not None:
            return base
        count = len(truth)
        outputs = tuple(
            TruthMetrics(
                name=name,
                dtype=_dtype(reference_outputs[0][name]),
                original=_compare([name], truth, reference_outputs[:count])[0],
                candidate=_compare([name], truth, candidate_outputs[:count])[0],
            )
            for name in self.model.output_names()
        )
        probes: tuple[TruthMetrics, ...] = ()
        note = base.note
        if probed is not None:
            probes, probe_note = self._folds(candidate_model, probed, provider, cuda_tf32)
            note = "; ".join(part for part in (note, probe_note) if part) or None
        return dataclasses.replace(base, outputs=outputs, probes=probes, note=note, elapsed_s=round(self._spent(), 4))

    def _whole_model(self) -> tuple[Float64Check, Outputs]:
        if self._outputs is None:
            self._outputs = self._run_whole_model()
        return self._outputs

    def _run_whole_model(self) -> tuple[Float64Check, Outputs]:
        reason = float64_reference.unavailable_reason(self.model, self.limits)
        if reason is not None:
            return Float64Check(unavailable=reason), []
        try:
            evaluator = float64_reference.make_evaluator(self.model, ())
        except Exception as error:
            return Float64Check(unavailable=f"no engine could evaluate the float64 copy: {one_line(error)}"), []
        names = self.model.output_names()
        truth: Outputs = []
        note = None
        total = len(self.batches)
        for iteration, batch in enumerate(self.batches):
            try:
                truth.append(evaluator.run(batch, names))
            except Exception as error:
                reason = f"{evaluator.engine} failed on iteration {iteration}: {one_line(error)}"
                return Float64Check(engine=evaluator.engine, unavailable=reason), []
            self.clock.tick("float64 reference", iteration + 1, total)
            if iteration + 1 < total and self._spent() > self.limits.time_budget_s:
                note = (
                    f"float64 run stopped after {iteration + 1} of {total} iteration(s): time budget "
                    f"{self.limits.time_budget_s:g} s spent"
                )
                break
        return Float64Check(engine=evaluator.engine, iterations=len(truth), note=note), truth

    def _folds(
        self, candidate_model: ModelSource, probed: _Probed, provider: str, cuda_tf32: bool
    ) -> tuple[tuple[TruthMetrics, ...], str | None]:
        """Each probed fold on its own (or, when it cannot be cut out, in the whole network)."""
        cut = {}
        shared = local_folds.shared_tensors(candidate_model, self.model, probed.names)
        for name in probed.names:
            inputs = local_folds.fold_inputs(candidate_model, name, shared)
            if inputs is not None:
                cut[name] = inputs
        batch = self.batches[0]  # a fold is an identity: one batch (of many positions) tests it
        computed = tuple(dict.fromkeys(name for inputs in cut.values() for name in inputs if name not in batch))
        try:
            session = make_session(self.model.with_extra_outputs(computed), CPU)
            feeds = [{**session.run(batch, computed), **batch}]
        except Exception as error:
            return (), f"folds not measured against float64: {one_line(error)}"
        results = []
        whole_network = []
        total = len(probed.names)
        for done, (name, (label, order, dtype)) in enumerate(probed.names.items(), start=1):
            measured = None
            if name in cut and self._spent() <= self.limits.time_budget_s:
                measured = self._fold(candidate_model, name, cut[name], feeds, provider, cuda_tf32)
            if measured is None:
                whole_network.append(label)
                continue
            original, candidate = measured
            folds = probed.folds.get(name, ())
            results.append(
                TruthMetrics(name, dtype, original, candidate, label=label, order=order, scope="fold", folds=folds)
            )
            self.clock.tick("float64 folds", done, total)
        note = None
        if whole_network:
            more = f" and {len(whole_network) - 3} more" if len(whole_network) > 3 else ""
            listed = ", ".join(whole_network[:3]) + more
            note = f"not measured fold by fold (cannot be cut out, or time budget spent): {listed}"
        return tuple(results), note

    def _fold(
        self,
        candidate_model: ModelSource,
        name: str,
        inputs: tuple[str, ...],
        feeds: Outputs,
        provider: str,
        cuda_tf32: bool,
    ) -> tuple[TensorMetrics, TensorMetrics] | None:
        dtypes = {input_name: feeds[0][input_name].dtype for input_name in inputs}
        original = local_folds.sub_model(self.model, inputs, name, dtypes)
        candidate = local_folds.sub_model(candidate_model, inputs, name, dtypes)
        if original is None or candidate is None:
            return None
        try:
            original_session = make_session(original, CPU)
            candidate_session = make_session(candidate, provider, cuda_tf32=cuda_tf32)
            evaluator = float64_reference.make_evaluator(original, ())
            local_feeds = [{input_name: _unit_scale(feed[input_name]) for input_name in inputs} for feed in feeds]
            truth = [evaluator.run(feed, (name,)) for feed in local_feeds]
            originals = [original_session.run(feed, [name]) for feed in local_feeds]
            candidates = [candidate_session.run(feed, [name]) for feed in local_feeds]
        except Exception:  # e.g. an op neither float64 engine runs: this fold is named in the note
            return None
        return _compare([name], truth, originals)[0], _compare([name], truth, candidates)[0]


def _unit_scale(array: np.ndarray) -> np.ndarray:
    """A floating fold input rescaled to unit RMS (other inputs unchanged).

    A fold is an algebraic identity, true for every input, so any input tests it; at unit scale its bias is
    not drowned in the rounding of the large activations of a badly conditioned network.
    """
    if array.dtype.kind != "f" or array.size == 0:
        return array
    wide = array.astype(np.float64)
    finite = wide[np.isfinite(wide)]
    rms = float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0
    return array if rms == 0 or not np.isfinite(rms) else (wide / rms).astype(array.dtype)


def _dtype(array: np.ndarray) -> str:
    return np.dtype(array.dtype).name


def _versions() -> dict[str, str]:
    from bnfold import __version__  # the package imports lazily; at module level this would be circular

    return {
        "bnfold": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
