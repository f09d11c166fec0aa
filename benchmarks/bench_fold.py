"""Fold speed and memory of bnfold against its peers and the floors (issue 7).

Generates three models, runs every tool as its own process in the same run (interleaved, several repetitions,
medians), measures wall time and peak RSS (``os.wait4`` rusage of the child), and writes a table of ratios to
``BENCHMARKS.md`` between ``<!-- fold-speed:begin -->`` and ``<!-- fold-speed:end -->``.

Models (seeded random weights, realistic BN statistics, Conv 3×3 without bias → BatchNormalization):

- ``external``: 260 × Conv3x3-512 + BN, weights as external data (2.3 GiB);
- ``selfcontained``: 26 layers of the same shape in one ``.onnx`` file (234 MiB);
- ``tiny``: a chain of 20,000 Conv(1×1, 1 channel) + BN pairs (graph work dominates).

Tools: ``copy`` (``cp`` of the model files: the floor), ``onnx_ir`` (load + save: the I/O floor of an onnx_ir
tool), ``bnfold`` (``bnfold fold --no-verify``), ``bnfold+verify`` (the default run with CPU verification; on
``selfcontained`` only), ``onnxscript`` (its three BN fusion rules + ``onnx_ir`` save), ``onnxruntime`` (offline
basic-level optimisation), ``onnxslim``, ``onnxsim``. A peer that is not installed is listed as such.

Usage::

    python benchmarks/bench_fold.py                 # full run, updates BENCHMARKS.md (takes ~15 min)
    python benchmarks/bench_fold.py --smoke         # tiny models, copy + bnfold only, 1 repetition, prints (CI)
    python benchmarks/bench_fold.py --cases tiny --repeat 1 --output -

Before each timed run the page cache holds the inputs (they were read once), ``sync`` has flushed earlier
outputs and the run waits ``--settle`` seconds (the file system discards a deleted multi-GiB output's blocks in
the background, which otherwise slows whichever tool runs next), so each tool starts from the same state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- fold-speed:begin -->", "<!-- fold-speed:end -->"
MiB = 1024**2


# --- models ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    title: str
    layers: int
    channels: int
    kernel: int
    external: bool
    repeat: int


FULL_CASES = (
    Case("external", "2.3 GiB, external data (260 × Conv3x3-512 + BN)", 260, 512, 3, True, 3),
    Case("selfcontained", "234 MiB, self-contained (26 × Conv3x3-512 + BN)", 26, 512, 3, False, 3),
    Case("tiny", "20,000 Conv+BN pairs of tiny tensors", 20_000, 1, 1, False, 2),
)
SMOKE_CASES = (
    Case("external", "smoke: 8 × Conv3x3-64 + BN, external data", 8, 64, 3, True, 1),
    Case("selfcontained", "smoke: 4 × Conv3x3-64 + BN, self-contained", 4, 64, 3, False, 1),
    Case("tiny", "smoke: 300 Conv+BN pairs of tiny tensors", 300, 1, 1, False, 1),
)


def generate(case: Case, directory: Path, seed: int = 0) -> Path:
    """Write the case's model into ``directory`` (weights streamed to the data file, never all in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{case.name}.onnx"
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    x = "input"
    with open(directory / data_name, "wb") if case.external else _NoFile() as data:
        for i in range(case.layers):
            shape = (case.channels, case.channels, case.kernel, case.kernel)
            # std 1/√fan_in keeps activations O(1) through the linear chain, so verification is meaningful
            fan_in = case.channels * case.kernel**2
            weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
            initializers.append(_tensor(f"w{i}", weight, data, data_name))
            for name, values in (
                ("gamma", rng.uniform(0.5, 1.5, case.channels)),
                ("beta", rng.normal(0.0, 0.2, case.channels)),
                ("mean", rng.normal(0.0, 0.2, case.channels)),
                ("var", rng.uniform(0.5, 2.0, case.channels)),
            ):
                initializers.append(_tensor(f"{name}{i}", values.astype(np.float32), None, data_name))
            pads = [case.kernel // 2] * 4
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"conv{i}"], name=f"conv{i}", pads=pads))
            bn_inputs = [f"conv{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"]
            nodes.append(helper.make_node("BatchNormalization", bn_inputs, [f"y{i}"], name=f"bn{i}"))
            x = f"y{i}"
    spatial = [1, case.channels, 8, 8]
    graph = helper.make_graph(
        nodes,
        case.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, spatial)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, spatial)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_fold")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


class _NoFile:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _tensor(name: str, array: np.ndarray, data, data_name: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
    if data is None:
        tensor.raw_data = array.tobytes()
        return tensor
    offset = data.tell()
    data.write(array.tobytes())
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def model_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


# --- tools (each runs in its own process) ---------------------------------------------------------------------

PEER_MODULES = {"onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "onnxslim": "onnxslim", "onnxsim": "onnxsim"}


def tool_command(tool: str, source: Path, destination: Path) -> list[str]:
    if tool == "copy":
        return ["cp", *map(str, model_files(source)), str(destination.parent)]
    if tool == "bnfold":
        return [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(destination), "--no-verify", "-q"]
    if tool == "bnfold+verify":
        return [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(destination), "-q"]
    return [sys.executable, str(Path(__file__).resolve()), "--tool", tool, str(source), str(destination)]


def run_tool_in_process(tool: str, source: str, destination: str) -> None:
    """The peers and the onnx_ir floor, as their users call them (this runs inside the measured child)."""
    external = Path(source + ".data").exists()
    data_name = Path(destination).name + ".data"
    if tool == "onnx_ir":
        import onnx_ir as ir

        ir.save(ir.load(source), destination, external_data=data_name if external else None)
    elif tool == "onnxscript":
        import onnx_ir as ir
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
        model = rewrite(ir.load(source), pattern_rewrite_rules=rules)
        ir.save(model, destination, external_data=data_name if external else None)
    elif tool == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = destination
        if external:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    elif tool == "onnxslim":
        import onnxslim

        onnxslim.slim(source, destination)
    elif tool == "onnxsim":
        import onnxsim

        model, _ = onnxsim.simplify(source)
        onnx.save(model, destination, save_as_external_data=external, location=data_name)
    else:
        raise SystemExit(f"unknown tool {tool!r}")


@dataclasses.dataclass
class Measurement:
    tool: str
    walls: list[float] = dataclasses.field(default_factory=list)
    rss: list[int] = dataclasses.field(default_factory=list)
    failure: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls and self.failure is None else None

    @property
    def peak_rss(self) -> int | None:
        return int(statistics.median(self.rss)) if self.rss and self.failure is None else None


TIME = shutil.which("time") and Path("/usr/bin/time").exists()


def measure(command: list[str], timeout: float) -> tuple[float, int, int, str]:
    """Run ``command``; return (wall seconds, peak RSS bytes, exit status, last stderr line).

    Peak RSS comes from ``/usr/bin/time`` (the measured process is exec'd from a small parent, so the
    benchmark's own memory is not counted); without it, from ``os.wait4`` of the child.
    """
    with tempfile.NamedTemporaryFile(suffix=".time") as report, tempfile.TemporaryFile() as stderr:
        wrapped = ["/usr/bin/time", "-f", "%M", "-o", report.name, *command] if TIME else command
        started = time.perf_counter()
        # A session of its own: a timeout kills the tool with its children (/usr/bin/time is only the parent).
        process = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            _, status, usage = os.wait4(process.pid, 0) if timeout is None else _wait(process, timeout)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - started, 0, -9, f"timeout after {timeout:.0f} s"
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss * 1024
        if TIME:
            text = Path(report.name).read_text().strip().splitlines()
            rss = int(text[-1]) * 1024 if text and text[-1].isdigit() else rss
        stderr.seek(0)
        lines = [line for line in stderr.read().decode(errors="replace").strip().splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if not line.startswith("Command ")), "")
    return wall, rss, process.returncode, message[:160]


def _wait(process: subprocess.Popen, timeout: float):
    deadline = time.perf_counter() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.perf_counter() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the whole group: a tool left running would skew the rest
            os.wait4(process.pid, 0)
            process.returncode = -9
            raise subprocess.TimeoutExpired(process.args, timeout)
        time.sleep(0.005)


def available(tool: str) -> bool:
    module = PEER_MODULES.get(tool)
    return module is None or importlib.util.find_spec(module) is not None


def run_case(
    case: Case, workdir: Path, tools: list[str], repeat: int, timeout: float, log, settle: float = 0.0
) -> dict[str, Measurement]:
    source = generate(case, workdir / "in")
    for file in model_files(source):  # warm the page cache
        with open(file, "rb") as handle:
            while handle.read(64 * MiB):
                pass
    results = {tool: Measurement(tool) for tool in tools}
    for tool in tools:
        if not available(tool):
            results[tool].failure = "not installed"
    for round_ in range(repeat):
        for tool in tools:
            result = results[tool]
            if result.failure is not None:
                continue
            out = workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            subprocess.run(["sync"], check=False)
            time.sleep(settle)  # let the file system finish discarding the previous output's blocks
            wall, rss, code, message = measure(tool_command(tool, source, out / source.name), timeout)
            if code != 0:
                result.failure = message or f"exit {code}"
            else:
                result.walls.append(wall)
                result.rss.append(rss)
            status = "ok" if code == 0 else f"FAILED ({result.failure})"
            log(f"  [{case.name} {round_ + 1}/{repeat}] {tool:14s} {wall:8.2f} s  {rss / MiB:8.0f} MiB  {status}")
            shutil.rmtree(out, ignore_errors=True)
    size = sum(file.stat().st_size for file in model_files(source))
    for file in model_files(source):
        file.unlink()
    return {"size": size, **results}


# --- report ---------------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f} MiB"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator in (None, 0):
        return "-"
    return f"{numerator / denominator:.2f}×"


def _versions() -> str:
    names = ["onnx", "onnx_ir", "onnxruntime", "onnxscript", "onnxslim", "onnxsim", "numpy"]
    found = []
    for name in names:
        try:
            module = __import__(name)
            found.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def machine_description(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {_versions()}. Load average before/after the run: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} (1 min). The 2 cores are shared with other work, so "
        "absolute times are noisy; ratios within one run are the meaningful figures."
    )


TARGETS = {
    "external": "targets: bnfold wall ≤ 1.5 × copy, peak RSS ≤ 512 MiB",
    "selfcontained": "targets: bnfold wall ≤ 0.9 × onnxscript and ≤ 1.1 × onnx_ir load+save, peak RSS ≤ 2.5 × file",
    "tiny": "target: bnfold wall ≤ 0.5 × the fastest peer",
}


def render(cases: list[Case], results: dict[str, dict], machine: str, repeat_note: str) -> str:
    lines = [
        "## Fold speed and memory (generated by `benchmarks/bench_fold.py`)",
        "",
        f"Machine: {machine}",
        "",
        f"Each tool runs as a separate process; {repeat_note}; wall time and peak RSS are medians. "
        "`copy` is `cp` of the model files, `onnx_ir` is `onnx_ir.load` + `onnx_ir.save`. "
        "Ratios: a tool's wall over the copy floor, and bnfold's wall / RSS over the tool's.",
        "",
    ]
    for case in cases:
        measured = results[case.name]
        size = measured["size"]
        copy = measured.get("copy")
        bn = measured.get("bnfold")
        lines += [
            f"### {case.title}: {size / MiB:,.0f} MiB on disk",
            "",
            TARGETS.get(case.name, ""),
            "",
            "| tool | wall | peak RSS | wall / copy | RSS / file size | bnfold wall / tool | bnfold RSS / tool |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for tool, result in measured.items():
            if tool == "size":
                continue
            if result.failure is not None:
                lines.append(f"| {tool} | {result.failure} | | | | | |")
                continue
            lines.append(
                f"| {tool} | {_seconds(result.wall)} | {_mib(result.peak_rss)} | "
                f"{_ratio(result.wall, copy.wall if copy else None)} | {_ratio(result.peak_rss, size)} | "
                f"{_ratio(bn.wall if bn else None, result.wall)} | "
                f"{_ratio(bn.peak_rss if bn else None, result.peak_rss)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace the text between the fold-speed markers (append the section when the markers are missing)."""
    section = f"{BEGIN}\n{body}{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# --- main -----------------------------------------------------------------------------------------------------

ALL_TOOLS = ["copy", "onnx_ir", "bnfold", "onnxscript", "onnxruntime", "onnxslim", "onnxsim"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, copy and bnfold only, 1 repetition; prints")
    parser.add_argument("--cases", default=None, help="comma-separated: external,selfcontained,tiny")
    parser.add_argument("--tools", default=None, help=f"comma-separated subset of {','.join(ALL_TOOLS)}")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per tool (default: per case)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a tool run is killed")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds to wait after flushing the previous output, before each run (default: 3; smoke: 0)",
    )
    parser.add_argument("--workdir", default=None, help="where models are generated (default: a temp dir)")
    parser.add_argument("--output", default=None, help="markdown file to update ('-' for stdout only)")
    parser.add_argument("--tool", nargs=3, metavar=("NAME", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tool:
        run_tool_in_process(*args.tool)
        return 0
    cases = list(SMOKE_CASES if args.smoke else FULL_CASES)
    if args.cases:
        wanted = args.cases.split(",")
        cases = [case for case in cases if case.name in wanted]
    tools = args.tools.split(",") if args.tools else (["copy", "bnfold"] if args.smoke else ALL_TOOLS)
    output = args.output or ("-" if args.smoke else os.fspath(REPO / "BENCHMARKS.md"))
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-", dir=args.workdir) as workdir:
        free = shutil.disk_usage(workdir).free
        needed = sum(
            case.layers * case.channels**2 * case.kernel**2 * 4 * (3 if case.external else 2) for case in cases
        )
        if free < needed:
            print(f"not enough disk space in {workdir}: {free / MiB:,.0f} MiB free, ~{needed / MiB:,.0f} needed")
            return 1
        for case in cases:
            case_tools = list(tools)
            if case.name == "selfcontained" and "bnfold" in case_tools and not args.smoke:
                case_tools.insert(case_tools.index("bnfold") + 1, "bnfold+verify")
            repeat = args.repeat or case.repeat
            print(f"{case.name}: {case.title}, {repeat} repetition(s)", flush=True)
            results[case.name] = run_case(
                case,
                Path(workdir) / case.name,
                case_tools,
                repeat,
                args.timeout,
                lambda t: print(t, flush=True),
                settle=(0.0 if args.smoke else 3.0) if args.settle is None else args.settle,
            )
    note = "repetitions per case: " + ", ".join(f"{case.name} {args.repeat or case.repeat}" for case in cases)
    body = render(cases, results, machine_description(load_before, os.getloadavg()), note)
    print(body)
    failed = [
        f"{case}: {tool}"
        for case, measured in results.items()
        for tool, result in measured.items()
        if tool in ("copy", "onnx_ir", "bnfold", "bnfold+verify") and result.failure is not None
    ]
    if output != "-":
        write_section(Path(output), body)
        print(f"updated {output}")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
