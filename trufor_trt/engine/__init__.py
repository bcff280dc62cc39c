"""Runners behind one interface, and the CPU stages around them (decode, prepare, postprocess).

Nothing here imports torch, onnxruntime or tensorrt at import time: each runner imports its
own backend when it is loaded.
"""

from .runner import RawOutputs, Runner

BACKENDS = ("onnxruntime", "torch")
BACKEND_EXTRAS = {"onnxruntime": "cpu", "torch": "export"}


def pick_backend(requested: str) -> str:
    """`auto` is TensorRT where a TensorRT runner can run and an engine for this GPU exists,
    else ONNX Runtime; this build has no TensorRT runner yet, so it is ONNX Runtime."""
    return "onnxruntime" if requested == "auto" else requested


def create_runner(backend: str, *, checkpoint=None, model=None, device: str = "auto",
                  precision: str = "fp32") -> Runner:
    """The runner for a backend name, not yet loaded. `model` is a model folder (or ModelDir)
    for the ONNX backends; `checkpoint` feeds the torch backend."""
    if backend == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(checkpoint, device=device, precision=precision)
    if backend == "onnxruntime":
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BACKEND_EXTRAS", "RawOutputs", "Runner", "create_runner", "pick_backend"]
