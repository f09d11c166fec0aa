"""The verification report: measurements (:class:`ProviderRun`) apart from verdicts (:class:`ProviderVerdict`).

A report is immutable. :meth:`VerifyReport.judge` re-judges the stored measurements under another
:class:`~bnfold.validate.tolerances.ToleranceTable` without running anything, exactly (see
:mod:`bnfold.validate.metrics` for why the stored error frontier suffices). ``to_dict``/``from_dict`` round-trip.

Verdicts: a provider that did not really run is SKIPPED (never PASSED); the report is FAILED when anything
failed, PASSED when every requested provider passed, SKIPPED otherwise.

A provider whose outputs fail the tolerance table on numbers alone (or that has float16/bfloat16 outputs
or probes, even when the table passes) is judged again against the float64 truth when the run measured it
(:class:`Float64Check`, see :mod:`bnfold.validate.float64_reference` and
:class:`~bnfold.validate.tolerances.Float64Rule`) and no atol/rtol was given explicitly: the verdict's
``basis`` is then ``"float64"``, and every output *and* every probed fold must pass the float64 rule.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterator, Mapping
from typing import Any

from bnfold.validate.metrics import TensorMetrics, encode_float
from bnfold.validate.tolerances import Float64Rule, Tolerance, ToleranceTable, is_reduced_precision


class Verdict(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The verdict on one tensor under one tolerance, with the smallest tolerances that would pass.

    ``required_atol`` is the smallest atol passing at ``tolerance.rtol``; ``required_rtol`` the smallest rtol
    passing at ``tolerance.atol`` (both ``None`` when no values could be compared).
    """

    name: str
    tolerance: Tolerance
    verdict: Verdict
    reasons: tuple[str, ...]
    required_atol: float | None
    required_rtol: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tolerance": self.tolerance.to_dict(),
            "verdict": self.verdict.value,
            "reasons": list(self.reasons),
            "required_atol": encode_float(self.required_atol),
            "required_rtol": encode_float(self.required_rtol),
        }


def judge_tensor(metrics: TensorMetrics, tolerance: Tolerance) -> Judgement:
    """Judge one tensor: presence, dtype, shapes, NaN/Inf placement, then ``|c - r| <= atol + rtol·|r|``."""
    reasons: list[str] = []
    errors = metrics.errors
    if metrics.missing:
        reasons.append("the candidate does not produce this tensor")
    else:
        if metrics.candidate_dtype != metrics.reference_dtype:
            reasons.append(f"dtype {metrics.candidate_dtype} differs from the reference's {metrics.reference_dtype}")
        for iteration in metrics.shape_mismatches:
            reasons.append(
                f"shape {list(metrics.candidate_shapes[iteration])} differs from the reference's "
                f"{list(metrics.reference_shapes[iteration])} (iteration {iteration})"
            )
        for count, what in (
            (metrics.new_nan, "new NaN"),
            (metrics.lost_nan, "reference NaN missing"),
            (metrics.new_inf, "new or sign-flipped Inf"),
            (metrics.lost_inf, "reference Inf missing"),
            (metrics.unequal, "differing string element(s)"),
        ):
            if count:
                reasons.append(f"{count} {what} in the candidate")
        if errors is not None and not errors.within(tolerance):
            reasons.append(
                f"max abs error {errors.max_abs:.3g} (max rel {errors.max_rel:.3g}) exceeds "
                f"atol={tolerance.atol:g} + rtol={tolerance.rtol:g}·|ref|; would pass with "
                f"atol={errors.required_atol(tolerance.rtol):.3g} or rtol={errors.required_rtol(tolerance.atol):.3g}"
            )
    return Judgement(
        name=metrics.name,
        tolerance=tolerance,
        verdict=Verdict.FAILED if reasons else Verdict.PASSED,
        reasons=tuple(reasons),
        required_atol=None if errors is None else errors.required_atol(tolerance.rtol),
        required_rtol=None if errors is None else errors.required_rtol(tolerance.atol),
    )


@dataclasses.dataclass(frozen=True)
class ProbeMetrics:
    """An intermediate tensor present in both models (e.g. a folded BN's output) and its measurements.

    ``label`` names what the tensor stands for (the BN node); ``order`` is the index of the node producing it
    in the original graph, so sorting by it is topological. ``folds`` names every BatchNormalization of the
    original between this tensor and where its fold begins (:func:`bnfold.validate.local_folds.folds_between`):
    more than ``label`` when another fold (e.g. a forward fold whose own output tensor is gone) wrote into the
    same layer, so that a divergence here may come from any of them. Empty: ``label`` alone.
    """

    label: str
    order: int
    metrics: TensorMetrics
    folds: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "order": self.order, "folds": list(self.folds), "metrics": self.metrics.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeMetrics:
        return cls(
            label=data["label"],
            order=int(data["order"]),
            metrics=TensorMetrics.from_dict(data["metrics"]),
            folds=tuple(data.get("folds", ())),
        )


@dataclasses.dataclass(frozen=True)
class TruthMetrics:
    """One tensor against the float64 truth: the original float32 model's distance and the candidate's.

    ``dtype`` is the tensor's element type in the original (it picks the floor of the float64 rule);
    ``label``/``order`` name a probed fold as in :class:`ProbeMetrics` (``None`` for graph outputs).
    ``scope`` is ``"network"`` (the whole model ran) or ``"fold"`` (the fold alone, cut out of both models
    and fed the original's float32 input: see :mod:`bnfold.validate.local_folds`).
    """

    name: str
    dtype: str
    original: TensorMetrics
    candidate: TensorMetrics
    label: str | None = None
    order: int | None = None
    scope: str = "network"
    folds: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "label": self.label,
            "order": self.order,
            "scope": self.scope,
            "folds": list(self.folds),
            "original": self.original.to_dict(),
            "candidate": self.candidate.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TruthMetrics:
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            original=TensorMetrics.from_dict(data["original"]),
            candidate=TensorMetrics.from_dict(data["candidate"]),
            label=data.get("label"),
            order=data.get("order"),
            scope=data.get("scope", "network"),
            folds=tuple(data.get("folds", ())),
        )


@dataclasses.dataclass(frozen=True)
class Float64Check:
    """What the float64 run measured for one provider, or why it did not run.

    Attributes:
        engine: what evaluated the float64 copy (onnxruntime or onnx.reference); ``None`` when not run.
        iterations: input batches compared (fewer than the verification's when the time budget ran out).
        elapsed_s: wall time of the float64 run (model widening, loading and every iteration).
        outputs: per graph output, the original's and the candidate's distance to the truth.
        probes: the same for each probed fold output.
        note: what limited the run (e.g. the time budget), if anything.
        unavailable: why there is no float64 verdict (model too large, no engine could run it).
    """

    engine: str | None = None
    iterations: int = 0
    elapsed_s: float = 0.0
    outputs: tuple[TruthMetrics, ...] = ()
    probes: tuple[TruthMetrics, ...] = ()
    note: str | None = None
    unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "iterations": self.iterations,
            "elapsed_s": self.elapsed_s,
            "outputs": [item.to_dict() for item in self.outputs],
            "probes": [item.to_dict() for item in self.probes],
            "note": self.note,
            "unavailable": self.unavailable,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Float64Check:
        return cls(
            engine=data.get("engine"),
            iterations=int(data.get("iterations", 0)),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
            outputs=tuple(TruthMetrics.from_dict(item) for item in data.get("outputs", ())),
            probes=tuple(TruthMetrics.from_dict(item) for item in data.get("probes", ())),
            note=data.get("note"),
            unavailable=data.get("unavailable"),
        )


def judge_against_truth(truth: TruthMetrics, floor: Tolerance, rule: Float64Rule) -> Judgement:
    """The float64 rule on one tensor: ``|c - t| <= ratio · max|o - t| + floor.atol + floor.rtol · |t|``."""
    original, candidate = truth.original.errors, truth.candidate.errors
    if original is None or candidate is None:
        reason = "no values comparable with the float64 evaluation"
        return Judgement(truth.name, floor, Verdict.FAILED, (reason,), None, None)
    bound = rule.bound(floor, original.max_abs)
    passed = candidate.within(bound)
    reasons = ()
    if not passed:
        reasons = (
            f"{candidate.max_abs:.3g} from the float64 evaluation where the original float32 model is "
            f"{original.max_abs:.3g}: beyond {rule.ratio:g}× the original's distance + atol={floor.atol:g} + "
            f"rtol={floor.rtol:g}·|float64|",
        )
    return Judgement(
        name=truth.name,
        tolerance=bound,
        verdict=Verdict.PASSED if passed else Verdict.FAILED,
        reasons=reasons,
        required_atol=candidate.required_atol(bound.rtol),
        required_rtol=candidate.required_rtol(bound.atol),
    )


def numeric_only(metrics: TensorMetrics) -> bool:
    """Whether the candidate's tensor differs from the reference in values only (present, same dtype and
    shapes, NaN/Inf in the same places): only then may float64 rounding explain a difference."""
    return (
        not metrics.missing
        and metrics.candidate_dtype == metrics.reference_dtype
        and not metrics.shape_mismatches
        and not (metrics.new_nan or metrics.lost_nan or metrics.new_inf or metrics.lost_inf or metrics.unequal)
    )


@dataclasses.dataclass(frozen=True)
class ProviderRun:
    """What was measured for the candidate on one provider (no verdict).

    Attributes:
        requested: the provider's short name as asked (``cpu``, ``cuda``).
        provider: the onnxruntime provider name.
        executed_providers: ``session.get_providers()`` of the candidate's session (empty when skipped).
        cuda_tf32: whether TF32 was allowed (CUDA only, else ``None``).
        skipped_reason: why the provider did not run (then nothing was measured).
        run_error: onnxruntime's error when the candidate failed to load or run.
        outputs: one entry per output of the original model, in graph order.
        noise_floor: the original model on this provider vs on the CPU (non-CPU providers only).
        probes: intermediate tensors measured to attribute a mismatch (only after a mismatch).
        probe_note: why some or all probes were not measured.
        float64: the float64 truth (only after a numeric mismatch, without explicit atol/rtol).
        elapsed_s: wall time spent on this provider.
    """

    requested: str
    provider: str
    executed_providers: tuple[str, ...] = ()
    cuda_tf32: bool | None = None
    skipped_reason: str | None = None
    run_error: str | None = None
    outputs: tuple[TensorMetrics, ...] = ()
    noise_floor: tuple[TensorMetrics, ...] = ()
    probes: tuple[ProbeMetrics, ...] = ()
    probe_note: str | None = None
    float64: Float64Check | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "provider": self.provider,
            "executed_providers": list(self.executed_providers),
            "cuda_tf32": self.cuda_tf32,
            "skipped_reason": self.skipped_reason,
            "run_error": self.run_error,
            "outputs": [metrics.to_dict() for metrics in self.outputs],
            "noise_floor": [metrics.to_dict() for metrics in self.noise_floor],
            "probes": [probe.to_dict() for probe in self.probes],
            "probe_note": self.probe_note,
            "float64": None if self.float64 is None else self.float64.to_dict(),
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProviderRun:
        return cls(
            requested=data["requested"],
            provider=data["provider"],
            executed_providers=tuple(data.get("executed_providers", ())),
            cuda_tf32=data.get("cuda_tf32"),
            skipped_reason=data.get("skipped_reason"),
            run_error=data.get("run_error"),
            outputs=tuple(TensorMetrics.from_dict(item) for item in data.get("outputs", ())),
            noise_floor=tuple(TensorMetrics.from_dict(item) for item in data.get("noise_floor", ())),
            probes=tuple(ProbeMetrics.from_dict(item) for item in data.get("probes", ())),
            probe_note=data.get("probe_note"),
            float64=None if data.get("float64") is None else Float64Check.from_dict(data["float64"]),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
        )


@dataclasses.dataclass(frozen=True)
class ProviderVerdict:
    """The verdict for one provider: per output, per probe, and the fold held responsible.

    ``divergent`` lists the labels of probes that fail their tolerance, in topological order; the first one
    is ``responsible`` (errors propagate downstream, so later probes diverge as a consequence).
    ``basis`` is ``"float32"`` (the tolerance table decided) or ``"float64"`` (the float64 rule decided:
    ``float64_outputs``/``float64_probes`` hold its judgements, and ``divergent`` comes from them).
    ``responsible_folds``: every fold that wrote the layers between the responsible probe and where its fold
    begins (``responsible`` plus, e.g., a forward fold into the same weight), in graph order; on a mismatch
    the measurement cannot tell them apart, so all are named.
    """

    requested: str
    verdict: Verdict
    outputs: tuple[Judgement, ...]
    probes: tuple[Judgement, ...]
    divergent: tuple[str, ...]
    responsible: str | None
    reasons: tuple[str, ...]
    basis: str = "float32"
    float64_outputs: tuple[Judgement, ...] = ()
    float64_probes: tuple[Judgement, ...] = ()
    responsible_folds: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "verdict": self.verdict.value,
            "reasons": list(self.reasons),
            "outputs": [judgement.to_dict() for judgement in self.outputs],
            "probes": [judgement.to_dict() for judgement in self.probes],
            "divergent": list(self.divergent),
            "responsible": self.responsible,
            "responsible_folds": list(self.responsible_folds),
            "basis": self.basis,
            "float64_outputs": [judgement.to_dict() for judgement in self.float64_outputs],
            "float64_probes": [judgement.to_dict() for judgement in self.float64_probes],
        }


def reduced_precision(run: ProviderRun) -> bool:
    """Whether an output or a probed tensor of ``run`` is float16 or bfloat16: then the tolerance table cannot
    tell a wrong fold from rounding, and the float64 rule decides even when the table passes."""
    return any(
        is_reduced_precision(metrics.reference_dtype)
        for metrics in (*run.outputs, *(probe.metrics for probe in run.probes))
    )


def float64_applies(run: ProviderRun, verdict: ProviderVerdict, tolerances: ToleranceTable) -> bool:
    """Whether the float64 truth judges this run: the table failed it on values only (the candidate ran; no
    NaN, shape or dtype difference in an output or a probe), or it passed but holds float16/bfloat16
    tensors (:func:`reduced_precision`: the table cannot tell a bug from rounding there); and no atol/rtol
    was given explicitly (a fixed bound stands alone)."""
    return (
        (verdict.verdict is Verdict.FAILED or (verdict.verdict is Verdict.PASSED and reduced_precision(run)))
        and run.run_error is None
        and not tolerances.fixed_bound
        and all(numeric_only(metrics) for metrics in (*run.outputs, *(probe.metrics for probe in run.probes)))
    )


def judge_run(run: ProviderRun, tolerances: ToleranceTable, rule: Float64Rule | None = None) -> ProviderVerdict:
    """Apply ``tolerances`` to the measurements of one provider (then the float64 rule, where it applies)."""
    verdict = _judge_float32(run, tolerances)
    if run.float64 is None or not float64_applies(run, verdict, tolerances):
        return verdict
    if run.float64.unavailable is not None:
        reason = f"no float64 verdict: {run.float64.unavailable}"
        if verdict.verdict is Verdict.PASSED:
            reason += " (the float16/bfloat16 table alone decided; it cannot tell a small fold bug from rounding)"
        return dataclasses.replace(verdict, reasons=(*verdict.reasons, reason))
    return _judge_float64(run, run.float64, verdict, tolerances, rule or Float64Rule())


def _judge_float64(
    run: ProviderRun, check: Float64Check, float32: ProviderVerdict, tolerances: ToleranceTable, rule: Float64Rule
) -> ProviderVerdict:
    def judge(truth: TruthMetrics) -> Judgement:
        return judge_against_truth(truth, rule.floor(truth.dtype, tolerances.for_output(truth.name, truth.dtype)), rule)

    outputs = tuple(judge(truth) for truth in check.outputs)
    ordered = sorted(check.probes, key=lambda truth: truth.order if truth.order is not None else -1)
    probes = tuple(judge(truth) for truth in ordered)
    divergent = tuple(
        truth.label or truth.name
        for truth, judgement in zip(ordered, probes, strict=True)
        if judgement.verdict is Verdict.FAILED
    )
    failed_outputs = [judgement.name for judgement in outputs if judgement.verdict is Verdict.FAILED]
    figures = ", ".join(
        f"{truth.name}: original {_figure(truth.original)}, candidate {_figure(truth.candidate)}"
        for truth in check.outputs
    )
    reasons: list[str] = []
    if failed_outputs:
        reasons.append(f"output(s) {', '.join(failed_outputs)} differ from the float64 evaluation ({figures})")
        if not divergent and check.probes:
            reasons.append(
                "no probed fold diverges when checked on its own: the difference arises outside the folded "
                "tensors, or in a fold whose error only the network's own inputs reveal"
            )
    elif divergent:
        reasons.append(f"the outputs are within the float64 rule ({figures}) but a fold diverges")
    elif float32.verdict is Verdict.PASSED:
        reasons.append(
            "float16/bfloat16 tensors: the float64 rule decided (the table cannot tell a fold bug from rounding); "
            f"the candidate is no farther from the float64 evaluation than the original allows ({figures})"
        )
    else:
        reasons.append(
            "float32 differences are rounding: the candidate is no farther from the float64 evaluation than "
            f"the original allows ({figures})"
        )
    responsible_folds = ()
    if divergent:
        first = next(truth for truth, j in zip(ordered, probes, strict=True) if j.verdict is Verdict.FAILED)
        responsible_folds = first.folds or (divergent[0],)
        reasons.append(_blame(divergent[0], responsible_folds))
    failed = bool(failed_outputs or divergent)
    return dataclasses.replace(
        float32,
        verdict=Verdict.FAILED if failed else Verdict.PASSED,
        divergent=divergent,
        responsible=divergent[0] if failed and divergent else None,
        responsible_folds=responsible_folds if failed else (),
        reasons=tuple(reasons),
        basis="float64",
        float64_outputs=outputs,
        float64_probes=probes,
    )


def _blame(first: str, folds: tuple[str, ...]) -> str:
    """The reason naming the first divergent fold and, when its tensor is written by several folds (a forward
    fold and a backward fold into one weight), every one of them: the measurement cannot tell them apart."""
    if len(folds) <= 1:
        return f"first divergent fold: {first}"
    return (
        f"first divergent fold: {first}, measured at its output, which the folds of {', '.join(folds)} "
        "all write (folded into the same layer): any of them may be wrong"
    )


def _figure(metrics: TensorMetrics) -> str:
    return "-" if metrics.errors is None else f"{metrics.errors.max_abs:.3g}"


def _judge_float32(run: ProviderRun, tolerances: ToleranceTable) -> ProviderVerdict:
    """The tolerance table alone."""
    if run.skipped_reason is not None:
        return ProviderVerdict(run.requested, Verdict.SKIPPED, (), (), (), None, (run.skipped_reason,))

    def judge(metrics: TensorMetrics) -> Judgement:
        return judge_tensor(metrics, tolerances.for_output(metrics.name, metrics.reference_dtype))

    outputs = tuple(judge(metrics) for metrics in run.outputs)
    ordered = sorted(run.probes, key=lambda probe: probe.order)
    probes = tuple(judge(probe.metrics) for probe in ordered)
    divergent = tuple(
        probe.label for probe, judgement in zip(ordered, probes, strict=True) if judgement.verdict is Verdict.FAILED
    )
    reasons: list[str] = []
    if run.run_error is not None:
        reasons.append(f"the candidate failed on {run.provider}: {run.run_error}")
    failed_outputs = [judgement.name for judgement in outputs if judgement.verdict is Verdict.FAILED]
    if failed_outputs:
        reasons.append(f"output(s) {', '.join(failed_outputs)} differ")
        if not divergent and run.probes:
            reasons.append("no probed fold diverges: the difference arises outside the folded tensors")
    elif divergent:
        reasons.append("the outputs are within tolerance but a fold's output is not (the network attenuates it)")
    responsible_folds: tuple[str, ...] = ()
    if divergent:
        first = next(probe for probe, j in zip(ordered, probes, strict=True) if j.verdict is Verdict.FAILED)
        responsible_folds = first.folds or (divergent[0],)
        reasons.append(_blame(divergent[0], responsible_folds))
    failed = run.run_error is not None or bool(failed_outputs) or bool(divergent)
    return ProviderVerdict(
        requested=run.requested,
        verdict=Verdict.FAILED if failed else Verdict.PASSED,
        outputs=outputs,
        probes=probes,
        divergent=divergent,
        responsible=divergent[0] if divergent and failed else None,
        reasons=tuple(reasons),
        responsible_folds=responsible_folds if failed else (),
    )


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One fed input: element type, the shape of each iteration, and whether it was generated or loaded."""

    name: str
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shapes": [list(s) for s in self.shapes],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecord:
        return cls(data["name"], data["dtype"], tuple(tuple(s) for s in data["shapes"]), data["source"])


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Original vs candidate on every requested provider: inputs, measurements, tolerances and verdicts.

    ``outputs`` names the original's outputs; ``problems`` are interface differences found before running
    (different inputs or outputs), and any problem fails the report.
    """

    original: str
    candidate: str
    seed: int | None
    iterations: int
    inputs: tuple[InputRecord, ...]
    problems: tuple[str, ...]
    runs: tuple[ProviderRun, ...]
    tolerances: ToleranceTable
    verdicts: tuple[ProviderVerdict, ...]
    outputs: tuple[str, ...] = ()
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0

    @classmethod
    def judged(cls, *, runs: tuple[ProviderRun, ...], tolerances: ToleranceTable, **fields: Any) -> VerifyReport:
        """Build a report from measurements, judging them under ``tolerances``."""
        verdicts = tuple(judge_run(run, tolerances) for run in runs)
        return cls(runs=runs, tolerances=tolerances, verdicts=verdicts, **fields)

    def judge(self, tolerances: ToleranceTable) -> VerifyReport:
        """The same measurements judged under other tolerances (nothing is run again)."""
        verdicts = tuple(judge_run(run, tolerances) for run in self.runs)
        return dataclasses.replace(self, tolerances=tolerances, verdicts=verdicts)

    @property
    def verdict(self) -> Verdict:
        if self.problems or any(v.verdict is Verdict.FAILED for v in self.verdicts):
            return Verdict.FAILED
        if self.verdicts and all(v.verdict is Verdict.PASSED for v in self.verdicts):
            return Verdict.PASSED
        return Verdict.SKIPPED

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASSED

    @property
    def failed(self) -> bool:
        return self.verdict is Verdict.FAILED

    @property
    def skipped_providers(self) -> tuple[str, ...]:
        return tuple(v.requested for v in self.verdicts if v.verdict is Verdict.SKIPPED)

    @property
    def responsible(self) -> tuple[str, ...]:
        """The folds held responsible for a mismatch, over all providers, without repeats: each provider's
        first divergent fold and every other fold that wrote into the same layer (``responsible_folds``)."""
        names = (name for v in self.verdicts for name in (v.responsible_folds or (v.responsible,)) if name)
        return tuple(dict.fromkeys(names))

    def results(self) -> Iterator[tuple[ProviderRun, ProviderVerdict]]:
        """Each provider's measurements with its verdict."""
        return zip(self.runs, self.verdicts, strict=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "original": self.original,
            "candidate": self.candidate,
            "seed": self.seed,
            "iterations": self.iterations,
            "inputs": [record.to_dict() for record in self.inputs],
            "outputs": list(self.outputs),
            "problems": list(self.problems),
            "responsible": list(self.responsible),
            "tolerances": self.tolerances.to_dict(),
            "providers": [{"run": run.to_dict(), "verdict": verdict.to_dict()} for run, verdict in self.results()],
            "versions": dict(self.versions),
            "elapsed_s": self.elapsed_s,
        }

    def to_json(self, **dumps_options: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | dumps_options))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerifyReport:
        """Rebuild a report saved with :meth:`to_dict`; verdicts are recomputed from the stored measurements."""
        return cls.judged(
            original=data["original"],
            candidate=data["candidate"],
            seed=data.get("seed"),
            iterations=int(data["iterations"]),
            inputs=tuple(InputRecord.from_dict(item) for item in data.get("inputs", ())),
            problems=tuple(data.get("problems", ())),
            outputs=tuple(data.get("outputs", ())),
            runs=tuple(ProviderRun.from_dict(item["run"]) for item in data.get("providers", ())),
            tolerances=ToleranceTable.from_dict(data["tolerances"]),
            versions=dict(data.get("versions", {})),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
        )

    @classmethod
    def from_json(cls, text: str) -> VerifyReport:
        return cls.from_dict(json.loads(text))
