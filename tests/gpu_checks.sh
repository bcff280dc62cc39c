#!/usr/bin/env bash
# The project's GPU checks as one command, for a machine with an NVIDIA GPU and no network
# (docs/tensorrt.md, "GPU checks"). Two steps:
#   bash tests/gpu_checks.sh fetch   here, with PyPI: what the GPU machine lacks, into .gpu-bundle/
#                                    (ignored by git): pure-Python wheels, the pycuda sdist, and
#                                    a copy of ../shared's reference data
#   bash tests/gpu_checks.sh run     on the GPU machine, with .gpu-bundle/ carried along: installs
#                                    those (pycuda builds with the nvcc there) and the project,
#                                    then the conv16 speed benchmark and `pytest -m gpu` (further
#                                    arguments go to pytest, e.g. -k "not tensorrt"); log and
#                                    measurements go to $OUT (or ./gpu-results): gpu-checks.log,
#                                    gpu-report.json, conv16-speed.json, gpu-throughput.json
# The GPU image is expected to hold Python 3.12 with PyTorch (CUDA), cuda-bindings, onnx,
# onnxruntime, OpenCV, numpy, typer, rich, pytest and setuptools; TensorRT tests skip without it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bundle="$repo/.gpu-bundle"
shared="${TRUFOR_SHARED:-$repo/../shared}"

fetch() {
  rm -rf "$bundle"
  mkdir -p "$bundle/packages"
  local pip=(python3 -m pip download --quiet --no-deps -d "$bundle/packages")
  "${pip[@]}" --no-binary :all: --no-build-isolation "pycuda>=2025.1.2"
  "${pip[@]}" pytools platformdirs mako onnx-graphsurgeon
  # pytools needs siphash24, a compiled package: the GPU machine's CPython 3.12 build of it.
  "${pip[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 siphash24
  mkdir -p "$bundle/shared"
  cp -r "$shared/reference" "$shared/weights" "$shared/data" "$bundle/shared/"
  du -sh "$bundle"
}

run() {
  local out="${OUT:-$repo/gpu-results}" site=/tmp/trufor-gpu-site
  mkdir -p "$out"
  local install=(python3 -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$site")
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  "${install[@]}" "$bundle"/packages/*.whl
  echo "building pycuda from its sdist (minutes)"
  "${install[@]}" "$bundle"/packages/pycuda-*.tar.gz
  # The project as a wheel installs it (its stages live at the repository's root).
  "${install[@]}" "$repo"
  export PYTHONPATH="$site" TRUFOR_SHARED="$bundle/shared" TRUFOR_GPU_REPORT="$out/gpu-report.json"
  # From outside the checkout, so that `trufor_trt` is the installed package, not the folder.
  cd /tmp
  python3 -m trufor_trt doctor | tee "$out/doctor.txt"
  set -o pipefail
  python3 -m trufor_trt.benchmarks.conv16_speed --json "$out/conv16-speed.json" || true
  # analyze's throughput against the runner's own rate (torch on CUDA, FP32, every core)
  python3 "$TRUFOR_SHARED/reference/make_checkpoint.py" /tmp/trufor-seed0.pth.tar --seed 0 >/dev/null
  python3 -m trufor_trt.benchmarks.gpu_throughput --checkpoint /tmp/trufor-seed0.pth.tar \
    --json "$out/gpu-throughput.json" || true
  python3 -m pytest "$repo/tests" -m gpu -v -rs -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu-checks.log"
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash tests/gpu_checks.sh fetch|run" >&2; exit 2 ;;
esac
