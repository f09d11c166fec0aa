"""Summarise a `benchmarks/cuda_check.sh run` folder as the Markdown table for BENCHMARKS.md's CUDA section.

Reads OUT/gpu.csv (nvidia-smi), OUT/doctor.json and every OUT/*.tf32-{off,on}.json that `bnfold MODEL --json`
wrote, and prints one row per model × TF32 setting: BNs folded, the verdict, the largest error of the CUDA run
against the CPU reference next to the CPU-vs-CUDA noise floor of the original model, and the times.

    python benchmarks/cuda_summary.py OUT > OUT/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _largest(metrics: list[dict], key: str = "max_abs") -> float | None:
    values = [m["errors"][key] for m in metrics if m.get("errors") and m["errors"].get(key) is not None]
    return max(values) if values else None


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}"


def rows(out: Path) -> list[str]:
    lines = [
        "| model | TF32 | BN folded | verdict | CUDA max abs error | CUDA noise floor | fold s | verify s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*.tf32-*.json")):
        name, tf32 = path.name[: -len(".json")].rsplit(".tf32-", 1)
        document = json.loads(path.read_text())
        fold, verify = document.get("fold") or {}, document.get("verify") or {}
        cuda = [entry["run"] for entry in verify.get("providers", []) if entry["run"]["requested"] == "cuda"]
        error = _largest(cuda[0]["outputs"]) if cuda else None
        floor = _largest(cuda[0]["noise_floor"]) if cuda else None
        folded = f"{fold.get('batch_norm_folded', '?')}/{fold.get('batch_norm_total', '?')}"
        seconds = document.get("seconds")
        lines.append(
            f"| {name} | {tf32} | {folded} | {verify.get('verdict', document.get('error') or '—')} | "
            f"{_figure(error)} | {_figure(floor)} | {_figure(seconds)} | {_figure(verify.get('elapsed_s'))} |"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    gpu = (out / "gpu.csv").read_text().strip().splitlines()[-1] if (out / "gpu.csv").exists() else "unknown"
    print(f"GPU: {gpu}\n")
    doctor = out / "doctor.json"
    if doctor.exists():
        versions = json.loads(doctor.read_text()).get("versions", {})
        print("versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + "\n")
    print("\n".join(rows(out)))
    failures = out / "failures.txt"
    if failures.exists():
        print("\nfailures:\n\n" + "\n".join(f"- {line}" for line in failures.read_text().splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
