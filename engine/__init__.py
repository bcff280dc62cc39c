"""Runners behind one interface, and the CPU stages around them (decode, prepare, postprocess).

Nothing here imports torch, onnxruntime, tensorrt or pycuda at import time: each runner
imports its own backend when it is loaded.
"""

import importlib.util

from .runner import RawOutputs, Runner

BACKENDS = ("tensorrt", "onnxruntime", "torch")
BACKEND_EXTRAS = {"tensorrt": "trt", "onnxruntime": "cpu", "torch": "export"}


def tensorrt_engine_ready(model_dir, precision: str) -> bool:
    """TensorRT and pycuda import, a GPU answers, and an engine for it exists in the folder."""
    if not all(importlib.util.find_spec(module) for module in ("tensorrt", "pycuda")):
        return False
    from .cuda import gpu_info
    from .tensorrt_plan import EngineError, find_engines

    try:
        import tensorrt

        return bool(find_engines(model_dir, gpu_info(), tensorrt.__version__, precision))
    except EngineError:
        return False


def pick_backend(requested: str, model_dir=None, precision: str = "fp32") -> str:
    """`auto`: TensorRT where it can run and an engine for this GPU exists, else ONNX Runtime."""
    if requested != "auto":
        return requested
    ready = model_dir is not None and tensorrt_engine_ready(model_dir, precision)
    return "tensorrt" if ready else "onnxruntime"


def create_runner(backend: str, *, checkpoint=None, model=None, device: str = "auto",
                  precision: str = "fp32", threads: int = 0, max_memory_bytes=None) -> Runner:
    """The runner for a backend name, not yet loaded. `model` is a model folder (or ModelDir)
    for the ONNX and TensorRT backends; `checkpoint` feeds the torch backend. `threads`: CPU
    threads per runner for the CPU backends (0: one per core), for runners side by side.
    `max_memory_bytes`: host budget per image for the CPU backends (default: physical memory)."""
    if backend == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(checkpoint, device=device, precision=precision, threads=threads,
                           max_memory_bytes=max_memory_bytes)
    if backend == "onnxruntime":
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, precision=precision, threads=threads,
                                 max_memory_bytes=max_memory_bytes)
    if backend == "tensorrt":
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner(model, precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BACKEND_EXTRAS", "RawOutputs", "Runner", "create_runner", "pick_backend"]
