#!/usr/bin/env bash
# The CUDA execution-provider checks of bnfold, as one short run on a machine with an NVIDIA GPU.
#
# Why a script: GPU time is scarce (a lent machine gives a session ~15 minutes), so everything that needs no GPU
# is prepared beforehand and the GPU run only measures. Two stages:
#
#   bash benchmarks/cuda_check.sh stage DIR     # here, with network and CPU torch: zoo + onnxruntime-gpu wheel
#   bash benchmarks/cuda_check.sh run DIR OUT   # there: install from DIR, run every CUDA check, write OUT/
#
# `stage` writes into DIR (keep it git-ignored, e.g. `.cuda/`): the quick zoo (fp32 and fp16 exports, built here
# so the GPU machine's own torch does not change the models), a training-mode model and its lowering, and the
# onnxruntime-gpu wheel split into parts of at most 50 MiB (the device tool carries at most 64 MiB a call; the
# wheel is ~255 MB: carry one part per call to a warm machine, the last call runs `run`). onnxruntime-gpu 1.31
# links CUDA 13 (libcublas.so.13, libcudart.so.13), which the lent machines' image provides with its torch.
#
# `run` installs onnxruntime-gpu (without its dependencies: the image has numpy, protobuf, flatbuffers) into a
# private target, and records into OUT/: doctor.json (device, versions, probes), cuda-tests.log (the `cuda`-marked
# tests), one fold JSON per zoo model × {TF32 off, TF32 on} (errors per output, CPU-vs-CUDA noise floor, times), and
# summary.md, the table for BENCHMARKS.md's CUDA section.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
dir="${2:-.cuda}"

case "$stage" in
stage)
    mkdir -p "$dir/zoo" "$dir/wheel"
    python -m models build "$dir/zoo" --quick
    python - "$dir" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# A training-mode BatchNormalization (opset 15, 3 outputs) for `bnfold lower-training`.
rng = np.random.default_rng(0)
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16, 12, 12])
outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "running_mean", "running_var")]
params = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), n) for n in ("scale", "bias", "mean")]
params.append(numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "var"))
node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y", "running_mean", "running_var"],
                        training_mode=1)
graph = helper.make_graph([node], "training_bn", [x], outputs, params)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), Path(sys.argv[1]) / "training_bn.onnx")
EOF
    bnfold lower-training "$dir/training_bn.onnx" -o "$dir/training_bn.lowered.onnx"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$dir/wheel" "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
    (cd "$dir/wheel" && split -b 50M -d ./*.whl part. && ls -1 ./*.whl >name && rm ./*.whl)
    du -sh "$dir"/* "$dir"/wheel/*
    ;;
run)
    out="${3:?usage: cuda_check.sh run DIR OUT}"
    mkdir -p "$out" /tmp/ort-wheel
    cat "$dir"/wheel/part.* >"/tmp/ort-wheel/$(basename "$(cat "$dir/wheel/name")")"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ort-site /tmp/ort-wheel/*.whl
    export PYTHONPATH="/tmp/ort-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
    python3 -m bnfold doctor --providers cuda --json "$out/doctor.json" || true
    python3 -m pytest -q -m cuda -rs -p no:cacheprovider tests/validate/test_validate_cuda.py \
        tests/training/test_training_function.py 2>&1 | tee "$out/cuda-tests.log" || true
    for model in "$dir"/zoo/*.onnx; do
        name="$(basename "$model" .onnx)"
        for tf32 in off on; do
            flag=$([ "$tf32" = on ] && echo --cuda-tf32 || true)
            python3 -m bnfold "$model" -o "/tmp/folded-$name.onnx" --providers cpu,cuda --require-provider $flag \
                -q --json "$out/$name.tf32-$tf32.json" || echo "$name tf32-$tf32: exit $?" >>"$out/failures.txt"
        done
    done
    python3 -m bnfold verify "$dir/training_bn.onnx" "$dir/training_bn.lowered.onnx" --providers cpu,cuda \
        --require-provider --json "$out/training_bn.json" || echo "training_bn: exit $?" >>"$out/failures.txt"
    python3 benchmarks/cuda_summary.py "$out" >"$out/summary.md" || true
    ;;
*)
    echo "usage: $0 stage DIR | run DIR OUT" >&2
    exit 2
    ;;
esac
