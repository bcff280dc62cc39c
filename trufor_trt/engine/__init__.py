"""Runners behind one interface, and the CPU stages around them (decode, prepare, postprocess).

Nothing here imports torch, onnxruntime or tensorrt at import time: each runner imports its
own backend when it is loaded.
"""

from .runner import RawOutputs, Runner

BACKENDS = ("torch",)


def create_runner(backend: str, *, checkpoint=None, device: str = "auto") -> Runner:
    """The runner for a backend name, not yet loaded."""
    if backend == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(checkpoint, device=device)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "RawOutputs", "Runner", "create_runner"]
