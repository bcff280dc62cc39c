"""Runners behind one interface, and the CPU stages around them (decode, prepare, postprocess).

Nothing here imports torch, onnxruntime, tensorrt or pycuda at import time: each runner
imports its own backend when it is loaded.
"""

import importlib.util

from trufor_trt.precision.kernel_models import SIMULATED_KERNEL_MODEL
from trufor_trt.engine.runner import RawOutputs, Runner

BACKENDS = ("tensorrt", "onnxruntime", "torch")


GPU_PACKAGES = ("tensorrt", "pycuda", "cuda.bindings")


def gpu_packages_present() -> bool:
    """Whether any TensorRT / CUDA package is installed (found, not imported: it may be broken)."""
    for name in GPU_PACKAGES:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a dotted name whose parent is missing or broken
            continue
    return False


def runtime_problem(trt, layer) -> str:
    """Why TensorRT cannot start a Runtime on this machine's GPU ('' if it can): importing
    TensorRT says nothing about whether its CUDA build runs on this driver."""
    from trufor_trt.errors import EngineError
    from trufor_trt.engine.tensorrt_start import start_runtime

    try:
        with layer.current():
            start_runtime(trt, layer.driver_version())
    except EngineError as exc:
        return str(exc)
    return ""


def tensorrt_problem(model_dir, precision: str, accept_unvalidated: bool = False) -> str:
    """Why TensorRT cannot run an engine of the model folder (a path, or an opened ModelDir) here,
    in one line ('' if it can): TensorRT and a CUDA layer must load, a GPU answer, a matching
    engine exist and TensorRT start a Runtime on this driver."""
    from trufor_trt.errors import EngineError, TruforError

    try:
        from trufor_trt.engine.cuda_layer import cuda_layer
        from trufor_trt.engine.model_dir import ModelDir
        from trufor_trt.engine.tensorrt_plan import survey_engines
        from trufor_trt.engine.tensorrt_start import import_tensorrt

        problems = []
        for check in (import_tensorrt, cuda_layer):
            try:
                check()
            except EngineError as exc:
                problems.append(str(exc))
        if problems:
            return "; ".join(problems)
        trt, layer = import_tensorrt(), cuda_layer()
        gpu = layer.gpu()
        model = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
        survey = survey_engines(model.path, gpu, trt.__version__, precision, model.variant_sha256(precision),
                                accept_unvalidated)
        return survey.problem(precision, gpu, trt.__version__, model.path) or runtime_problem(trt, layer)
    except TruforError as exc:  # the CUDA layer's or TensorRT's, or a folder without the graph
        return str(exc)


def pick_backend(requested: str, model_dir=None, precision: str = "fp32", on_notice=None,
                 accept_unvalidated: bool = False) -> str:
    """`auto`: TensorRT where it can run an engine of the folder here, else ONNX Runtime. Where
    TensorRT or CUDA packages are installed but cannot be used, `on_notice` hears why."""
    if requested != "auto":
        return requested
    why = tensorrt_problem(model_dir, precision, accept_unvalidated) if model_dir is not None else "no model folder"
    if not why:
        return "tensorrt"
    if on_notice is not None and gpu_packages_present():
        on_notice(f"TensorRT not used ({why}); running ONNX Runtime")
    return "onnxruntime"


def create_runner(backend: str, *, checkpoint=None, model=None, device: str = "auto",
                  precision: str = "fp32", threads: int = 0, max_memory_bytes=None,
                  kernel_model: str = SIMULATED_KERNEL_MODEL, accept_unvalidated: bool = False,
                  engine=None) -> Runner:
    """The runner for a backend name, not yet loaded. `model` is a model folder (or ModelDir)
    for the ONNX and TensorRT backends; `checkpoint` feeds the torch backend. `threads`: CPU
    threads per runner for the CPU backends (0: one per core), for runners side by side.
    `max_memory_bytes`: host budget per image for the CPU backends (default: physical memory);
    for TensorRT the most device memory one engine or chain may take (a Jetson's is the host's).
    `kernel_model`: how ONNX Runtime simulates the float16 convolutions of an FP16 / INT8
    variant (precision/fp16.py's KERNEL_MODELS). TensorRT: `accept_unvalidated` runs reduced-
    precision engines not validated within budget on their GPU; `engine`: that engine alone."""
    if backend == "torch":
        from trufor_trt.engine.torch_runner import TorchRunner

        return TorchRunner(checkpoint, device=device, precision=precision, threads=threads,
                           max_memory_bytes=max_memory_bytes)
    if backend == "onnxruntime":
        from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, precision=precision, threads=threads,
                                 max_memory_bytes=max_memory_bytes, kernel_model=kernel_model)
    if backend == "tensorrt":
        from trufor_trt.engine.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(model, precision=precision, accept_unvalidated=accept_unvalidated, engine=engine,
                              max_memory_bytes=max_memory_bytes)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "RawOutputs", "Runner", "create_runner", "pick_backend"]
