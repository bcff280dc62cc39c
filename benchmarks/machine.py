"""What the numbers were measured on: CPU, memory, GPU, package versions; and the CPU's
measured FP32 GEMM rate, since its nominal peak depends on clocks and FMA units that no file
reports reliably (inside a VM least of all)."""

import os
import platform
import shutil
import subprocess
import time

import numpy as np

from trufor_trt.engine.memory_budget import physical_memory
from trufor_trt.installed import distribution_versions

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
PACKAGES = ("trufor-trt", "numpy", "opencv-python-headless", "onnxruntime", "onnx", "torch",
            "tensorrt", "pycuda")
GEMM_SIDE = 2048
GEMM_REPEAT = 5


def _cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _physical_cores() -> int:
    """Distinct (socket, core) pairs in /proc/cpuinfo; the logical count where it has none."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        text = ""
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(":") for line in block.splitlines())}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or os.cpu_count() or 1


def _gpus() -> list:
    """Name and memory of each NVIDIA GPU nvidia-smi lists (none without the driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [dict(zip(("name", "memory", "driver"), (part.strip() for part in line.split(","))))
            for line in listed.stdout.splitlines() if line.strip()]


def _versions() -> dict:
    installed = {name: version for name, version in distribution_versions(PACKAGES).items() if version}
    return {"python": platform.python_version(), **installed}


def machine_info() -> dict:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": [cpu.get("cpu family"), cpu.get("model")],
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
        "memory_bytes": physical_memory(),
        "os": platform.platform(),
        "gpus": _gpus(),
        "versions": _versions(),
    }


def _best_rate(multiply, side: int) -> float:
    """GFLOP/s of the fastest of GEMM_REPEAT square products (after one warm-up)."""
    multiply()
    best = float("inf")
    for _ in range(GEMM_REPEAT):
        start = time.perf_counter()
        multiply()
        best = min(best, time.perf_counter() - start)
    return 2 * side ** 3 / best / 1e9


def _onnxruntime_gemm(a: np.ndarray, b: np.ndarray):
    """ONNX Runtime's own SGEMM (MLAS), the kernels its convolutions use; None without onnx."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ModuleNotFoundError:
        return None
    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", value[:2], value[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def gemm_rates(side: int = GEMM_SIDE) -> dict:
    """Square FP32 GEMM throughput (GFLOP/s) of each library at hand, on all cores. The best
    is a lower bound on the CPU's FP32 peak: what a well-tuned dense kernel reaches here."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((side, side), dtype=np.float32) for _ in range(2))
    rates = {"numpy": _best_rate(lambda: a @ b, side)}
    ort_multiply = _onnxruntime_gemm(a, b)
    if ort_multiply is not None:
        rates["onnxruntime"] = _best_rate(ort_multiply, side)
    return rates
