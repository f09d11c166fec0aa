"""Compare bnfold with other BatchNormalization folders on the model zoo and write the table to BENCHMARKS.md.

For every model (the zoo's TorchScript opset-17 fp32 files and raw dynamo opset-18 exports
(``optimize=False``), a few other export paths, and — with ``--third-party`` — the installed third-party models
of ``models/third_party.py``):

- bnfold: BN total / folded / skipped (by reason), max abs error vs the original (onnxruntime CPU,
  optimisations off, seeded inputs, via ``bnfold.validate.verify``), node count and file size before/after,
  and onnxruntime latency (batch 1, one thread, median) of original vs folded with optimisations disabled
  and at the default level (``ORT_ENABLE_ALL``);
- peers, run on the same files in the same run: onnxslim (``onnxslim.slim``), onnxsim
  (``onnxsim.simplify``), onnxscript's BN rewrite rules alone (``fuse_batchnorm_into_{conv,conv_transpose,gemm}``),
  onnxscript's optimizer (``onnxscript.optimizer.optimize``: constant folding + its default rewrite rules, what
  ``torch.onnx.export(dynamo=True)`` runs by default) and onnxruntime's offline optimisation
  (``optimized_model_filepath`` at ``ORT_ENABLE_BASIC``): BN folded (BN nodes before − after), max abs error and
  verdict under the same check;
- totals per export kind: BNs folded by each tool over all zoo files of that kind.

Usage (from the repository root; peers: ``pip install -e '.[bench]'``)::

    python benchmarks/compare_models.py                 # build the zoo subset into a temp dir, update BENCHMARKS.md
    python benchmarks/compare_models.py --third-party --runs 50 --json results.json

Only the text between ``<!-- models-table:begin -->`` and ``<!-- models-table:end -->`` in BENCHMARKS.md is
replaced (the file is created when missing). A peer that is not installed or fails shows ``n/a`` / ``error``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_ROOT))

import bnfold  # noqa: E402
from bnfold import files as bnfold_files  # noqa: E402
from bnfold.validate import generate_inputs, input_specs, verify  # noqa: E402
from models.build import Variant, build_variant, count_ops, prepared_model  # noqa: E402
from models.export import Exporter  # noqa: E402
from models.third_party import THIRD_PARTY, locate  # noqa: E402
from models.zoo import ZOO  # noqa: E402

BEGIN_MARKER = "<!-- models-table:begin -->"
END_MARKER = "<!-- models-table:end -->"
PEERS = ("onnxslim", "onnxsim", "onnxscript", "onnxscript-opt", "ort-basic")
PEER_TITLES = {
    "bnfold": "bnfold",
    "onnxslim": "onnxslim",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript BN rules",
    "onnxscript-opt": "onnxscript optimizer",
    "ort-basic": "onnxruntime offline (basic)",
}
LATENCY_LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: Export paths every zoo model gets: TorchScript opset 17 fp32 and the raw dynamo export (``optimize=False``,
#: the recipe of docs/rules.md; bias-less Convs get a zero bias computed at run time).
EVERY_MODEL_VARIANTS: tuple[Variant, ...] = (Variant(Exporter.TORCHSCRIPT, 17), Variant(Exporter.DYNAMO, 18))

#: Export paths benchmarked for some models only.
EXTRA_VARIANTS: tuple[tuple[str, Variant], ...] = (
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 17, "float16")),
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True)),
    ("resnet_basic", Variant(Exporter.TORCHSCRIPT, 9, initializers_as_inputs=True, ir3=True)),
    ("resnet_basic", Variant(Exporter.DYNAMO, 18, constant_folded=True)),
    ("levit", Variant(Exporter.DYNAMO, 18, constant_folded=True)),
    ("mixnet", Variant(Exporter.DYNAMO, 18, constant_folded=True)),
    ("unet", Variant(Exporter.DYNAMO, 18, "float16", constant_folded=True)),
)


Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Subject:
    """A file to benchmark, the input shapes its dynamic dims need (``name → shape``), and for zoo models a
    float64 reference: the torch module evaluated in double precision on the same inputs."""

    label: str
    path: Path
    kind: str = "third-party"
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reference: Reference | None = None


@dataclass
class ToolOutcome:
    """What one tool did to one file."""

    batchnorms_after: int | None = None
    nodes_after: int | None = None
    size_after: int | None = None
    max_abs_error: float | None = None
    fp64_error: float | None = None
    verdict: str | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class Comparison:
    """All measurements of one subject (``kind``: the zoo variant tag, or ``third-party``)."""

    label: str
    kind: str
    batchnorms: int
    nodes_before: int
    size_before: int
    original_fp64_error: float | None = None
    bnfold_skipped: dict[str, int] = field(default_factory=dict)
    tools: dict[str, ToolOutcome] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)


# --- the tools ------------------------------------------------------------------------------------------


def run_bnfold(source: Path, target: Path) -> dict[str, int]:
    """Fold with bnfold's API; returns the skip counts by reason."""
    folded, report = bnfold.fold(source)
    bnfold_files.save_model(folded, target)
    return dict(report.to_dict()["skipped_by_reason"])


def run_onnxslim(source: Path, target: Path) -> None:
    import onnxslim

    onnx.save(onnxslim.slim(str(source)), target)


def run_onnxsim(source: Path, target: Path) -> None:
    import onnxsim

    simplified, _ = onnxsim.simplify(str(source))
    onnx.save(simplified, target)


def run_onnxscript(source: Path, target: Path) -> None:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    model = ir.load(source)
    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    ir.save(rewriter.rewrite(model, pattern_rewrite_rules=rules), target)


def run_onnxscript_optimizer(source: Path, target: Path) -> None:
    import onnxscript.optimizer

    model = ir.load(source)
    onnxscript.optimizer.optimize(model)
    ir.save(model, target)


def run_ort_basic(source: Path, target: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


PEER_RUNNERS: dict[str, Callable[[Path, Path], None]] = {
    "onnxslim": run_onnxslim,
    "onnxsim": run_onnxsim,
    "onnxscript": run_onnxscript,
    "onnxscript-opt": run_onnxscript_optimizer,
    "ort-basic": run_ort_basic,
}


# --- measurements ---------------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:160]


def measure(subject: Subject, candidate: Path, outcome: ToolOutcome) -> None:
    """Fill ``outcome`` with the candidate's BN/node counts, size and error against the original."""
    model = ir.load(candidate)
    outcome.batchnorms_after = count_ops(model, "BatchNormalization")
    outcome.nodes_after = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    outcome.size_after = bnfold_files.files_size_bytes(candidate)
    report = verify(subject.path, candidate, input_shapes=subject.input_shapes or None)
    outcome.verdict = str(report.verdict)
    errors = [metrics.errors.max_abs for run in report.runs for metrics in run.outputs if metrics.errors is not None]
    outcome.max_abs_error = max(errors) if errors else None
    if report.problems and outcome.verdict != "passed":
        outcome.error = report.problems[0][:160]
    outcome.fp64_error = fp64_error(subject, candidate)


def reference_inputs(subject: Subject) -> list[dict[str, np.ndarray]]:
    proto = onnx.load(subject.path, load_external_data=False)
    return generate_inputs(input_specs(proto), seed=1, iterations=2, input_shapes=subject.input_shapes or None)


def fp64_error(subject: Subject, candidate: Path) -> float | None:
    """Max abs difference between ``candidate`` (onnxruntime CPU, optimisations off) and the float64 torch
    reference; ``None`` without a reference. Shows whether a fold moved the model towards or away from the
    exact result, which "error vs the original" cannot tell for fp16."""
    if subject.reference is None:
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(candidate), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in reference_inputs(subject):
        for exact, got in zip(subject.reference(feeds), session.run(None, feeds), strict=True):
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - exact))))
    return worst


def latency_ms(path: Path, level: ort.GraphOptimizationLevel, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median wall time of ``runs`` single-threaded inferences (after 3 warm-ups), in milliseconds."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def compare(subject: Subject, work: Path, runs: int, peers: Sequence[str]) -> Comparison:
    original = ir.load(subject.path)
    comparison = Comparison(
        label=subject.label,
        kind=subject.kind,
        batchnorms=count_ops(original, "BatchNormalization"),
        nodes_before=sum(1 for _ in ir.traversal.RecursiveGraphIterator(original.graph)),
        size_before=bnfold_files.files_size_bytes(subject.path),
        original_fp64_error=fp64_error(subject, subject.path),
    )
    stem = subject.label.replace("/", "_")
    folded = work / f"{stem}.bnfold.onnx"
    outcome = ToolOutcome()
    try:
        started = time.perf_counter()
        comparison.bnfold_skipped = run_bnfold(subject.path, folded)
        outcome.seconds = time.perf_counter() - started
        measure(subject, folded, outcome)
    except Exception as error:  # a benchmark reports failures instead of stopping
        outcome.error = one_line(error)
    comparison.tools["bnfold"] = outcome
    for peer in peers:
        outcome = ToolOutcome()
        target = work / f"{stem}.{peer}.onnx"
        try:
            started = time.perf_counter()
            PEER_RUNNERS[peer](subject.path, target)
            outcome.seconds = time.perf_counter() - started
            measure(subject, target, outcome)
        except ImportError as error:
            outcome.error = f"not installed ({error.name})"
        except Exception as error:
            outcome.error = one_line(error)
        comparison.tools[peer] = outcome
    if comparison.tools["bnfold"].error is None:
        try:
            proto = onnx.load(subject.path, load_external_data=False)
            feeds = generate_inputs(input_specs(proto), iterations=1, input_shapes=subject.input_shapes or None)[0]
            for level_name, level in LATENCY_LEVELS.items():
                comparison.latency_ms[f"original/{level_name}"] = latency_ms(subject.path, level, feeds, runs)
                comparison.latency_ms[f"bnfold/{level_name}"] = latency_ms(folded, level, feeds, runs)
        except Exception as error:
            comparison.latency_ms = {}
            comparison.tools["bnfold"].error = f"latency: {one_line(error)}"
    return comparison


# --- subjects -------------------------------------------------------------------------------------------


def torch_reference(name: str) -> Reference:
    """The calibrated zoo module in float64, fed the (upcast) ONNX inputs in graph order."""
    import copy

    import torch

    module = copy.deepcopy(prepared_model(name)).double().eval()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            output = module(*(torch.from_numpy(value.astype(np.float64)) for value in feeds.values()))
        return [output.numpy()]

    return run


def zoo_subjects(zoo_dir: Path, names: Sequence[str] | None) -> list[Subject]:
    selected = [entry.name for entry in ZOO if not names or entry.name in names]
    cases = [(name, variant) for variant in EVERY_MODEL_VARIANTS for name in selected]
    cases += [(name, variant) for name, variant in EXTRA_VARIANTS if name in selected]
    return [
        Subject(
            f"{name} ({variant.tag})",
            build_variant(name, variant, zoo_dir),
            kind=variant.tag,
            reference=torch_reference(name),
        )
        for name, variant in cases
    ]


def third_party_subjects() -> list[Subject]:
    subjects = []
    for model in THIRD_PARTY:
        path = locate(model)
        if path is not None and model.runnable:
            subjects.append(
                Subject(f"{model.name} ({model.distribution})", path, input_shapes=dict(model.input_shapes))
            )
    return subjects


# --- the table ------------------------------------------------------------------------------------------


def fmt_error(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def fmt_size(size: int | None) -> str:
    return "—" if size is None else f"{size / 1024:.0f}"


def peer_cell(comparison: Comparison, peer: str) -> str:
    outcome = comparison.tools.get(peer)
    if outcome is None:
        return "n/a"
    if outcome.batchnorms_after is None:
        return "n/a" if outcome.error and outcome.error.startswith("not installed") else "error"
    folded = comparison.batchnorms - outcome.batchnorms_after
    flag = "" if outcome.verdict == "passed" else f" **{outcome.verdict}**"
    exact = "" if outcome.fp64_error is None else f" ({fmt_error(outcome.fp64_error)})"
    return f"{folded} / {fmt_error(outcome.max_abs_error)}{exact}{flag}"


def render_table(comparisons: Sequence[Comparison], runs: int) -> str:
    lines = [
        f"Generated by `python benchmarks/compare_models.py` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"{peer_versions()}). Errors: max abs difference to the original on onnxruntime CPU with optimisations "
        "off (3 seeded input batches), verdict under bnfold's dtype tolerance table. Latency: median of "
        f"{runs} runs, batch 1, one thread, milliseconds.",
        "",
        "### bnfold",
        "",
        "| model | BN | folded | skipped (reason) | max abs err | verdict | err vs fp64: orig → folded "
        "| nodes before → after | KiB before → after | ms orig/folded (opt off) | ms orig/folded (ORT default) |",
        "|---|---:|---:|---|---:|---|---|---|---|---|---|",
    ]
    for comparison in comparisons:
        bnfold_outcome = comparison.tools["bnfold"]
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(comparison.bnfold_skipped.items()))
        folded = (
            "error"
            if bnfold_outcome.batchnorms_after is None
            else comparison.batchnorms - bnfold_outcome.batchnorms_after
        )
        latency = comparison.latency_ms

        def pair(level: str, latency: dict[str, float] = latency) -> str:
            if f"original/{level}" not in latency:
                return "—"
            return f"{latency[f'original/{level}']:.2f} / {latency[f'bnfold/{level}']:.2f}"

        lines.append(
            f"| {comparison.label} | {comparison.batchnorms} | {folded} | {skipped or '—'} "
            f"| {fmt_error(bnfold_outcome.max_abs_error)} | {bnfold_outcome.verdict or bnfold_outcome.error} "
            f"| {fmt_error(comparison.original_fp64_error)} → {fmt_error(bnfold_outcome.fp64_error)} "
            f"| {comparison.nodes_before} → {bnfold_outcome.nodes_after or '—'} "
            f"| {fmt_size(comparison.size_before)} → {fmt_size(bnfold_outcome.size_after)} "
            f"| {pair('off')} | {pair('default')} |"
        )
    tools = ("bnfold", *PEERS)
    lines += [
        "",
        "### Same files, other tools: BN folded / max abs err vs original (vs fp64 reference; verdict if not passed)",
        "",
        "| model | BN | " + " | ".join(PEER_TITLES[tool] for tool in tools) + " |",
        "|---|---:|" + "---|" * len(tools),
    ]
    for comparison in comparisons:
        cells = " | ".join(peer_cell(comparison, tool) for tool in tools)
        lines.append(f"| {comparison.label} | {comparison.batchnorms} | {cells} |")
    lines += ["", *render_totals(comparisons, tools)]
    failures = [
        f"- {comparison.label}, {tool}: {outcome.error}"
        for comparison in comparisons
        for tool, outcome in comparison.tools.items()
        if outcome.error and not outcome.error.startswith("not installed")
    ]
    if failures:
        lines += ["", "Failures:", "", *failures]
    return "\n".join(lines)


def folded_count(comparison: Comparison, tool: str) -> int:
    """BNs ``tool`` removed from the file while verification passed (0 for a failed or wrong result)."""
    outcome = comparison.tools.get(tool)
    if outcome is None or outcome.batchnorms_after is None or outcome.verdict != "passed":
        return 0
    return comparison.batchnorms - outcome.batchnorms_after


def render_totals(comparisons: Sequence[Comparison], tools: Sequence[str]) -> list[str]:
    """BNs folded (with a passed verification) per tool, summed over the zoo files of each export kind."""
    kinds = list(dict.fromkeys(comparison.kind for comparison in comparisons if comparison.kind != "third-party"))
    lines = [
        "### Totals over the zoo: BN folded (verification passed) / BN in the files, per export kind",
        "",
        "| export kind | files | " + " | ".join(PEER_TITLES[tool] for tool in tools) + " |",
        "|---|---:|" + "---|" * len(tools),
    ]
    for kind in kinds:
        selected = [comparison for comparison in comparisons if comparison.kind == kind]
        total = sum(comparison.batchnorms for comparison in selected)
        cells = " | ".join(
            f"{sum(folded_count(comparison, tool) for comparison in selected)} / {total}" for tool in tools
        )
        lines.append(f"| {kind} | {len(selected)} | {cells} |")
    return lines


def peer_versions() -> str:
    import importlib.metadata

    found = []
    for distribution in ("onnxslim", "onnxsim", "onnxscript"):
        try:
            found.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{distribution} not installed")
    return ", ".join(found)


def write_between_markers(path: Path, table: str) -> None:
    """Replace the text between the markers in ``path`` (append the marked block when absent)."""
    block = f"{BEGIN_MARKER}\n{table}\n{END_MARKER}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN_MARKER in text and END_MARKER in text:
        before, rest = text.split(BEGIN_MARKER, 1)
        _, after = rest.split(END_MARKER, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n## Model zoo: bnfold and other folders\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "BENCHMARKS.md", help="markdown file to update")
    parser.add_argument("--zoo-dir", type=Path, help="build/reuse zoo files here (default: a temporary dir)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these zoo models")
    parser.add_argument("--third-party", action="store_true", help="also the installed third-party models")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peer tools to run")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency measurement")
    parser.add_argument("--json", type=Path, help="also write the raw measurements as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnfold-compare-") as scratch:
        work = Path(scratch)
        subjects = zoo_subjects(args.zoo_dir or work / "zoo", args.models)
        if args.third_party:
            subjects += third_party_subjects()
        comparisons = []
        for subject in subjects:
            print(f"comparing {subject.label} ...", file=sys.stderr, flush=True)
            comparisons.append(compare(subject, work, args.runs, args.peers))
    write_between_markers(args.out, render_table(comparisons, args.runs))
    if args.json:
        args.json.write_text(json.dumps([asdict(comparison) for comparison in comparisons], indent=2) + "\n")
    print(f"updated {args.out} ({len(comparisons)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
