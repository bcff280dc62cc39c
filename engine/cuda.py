"""The CUDA layer: the little of CUDA that the TensorRT runner and builder need, behind one
interface, with two implementations: pycuda (the `trt` extra) and NVIDIA's cuda-python
(`cuda-bindings`, the `trt-cuda-python` extra; TensorRT's own samples use it since 10.14, and it
needs no compiler on a Jetson).

Whichever imports is used, pycuda first; `TRUFOR_TRT_CUDA=pycuda|cuda-python` chooses one.
Each layer retains a device's primary context (the one the CUDA runtime and TensorRT use) once
per process and keeps it; `current()` makes it current on the calling thread for one call, so
runners work from any thread. Broken installs (a libcuda that fails to load raises OSError or
ImportError, not ModuleNotFoundError) become one-line EngineErrors.
"""

import os
from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np

from ..errors import one_line
from .tensorrt_plan import EngineError, Gpu

LAYER_ENV = "TRUFOR_TRT_CUDA"
LAYERS = ("pycuda", "cuda-python")
INSTALL = {"pycuda": 'pip install "trufor-trt[trt]" (pycuda builds against the local CUDA toolkit)',
           "cuda-python": 'pip install "trufor-trt[trt-cuda-python]"'}


class DeviceBuffer(ABC):
    address: int

    @abstractmethod
    def free(self) -> None: ...


class PinnedBuffer(ABC):
    """Page-locked host memory, seen as a flat numpy array of bytes (`array`)."""

    array: np.ndarray

    def view(self, dtype, count: int) -> np.ndarray:
        return self.array[:count * np.dtype(dtype).itemsize].view(dtype)

    @abstractmethod
    def free(self) -> None: ...


class Stream(ABC):
    handle: int

    @abstractmethod
    def synchronize(self) -> None: ...

    def close(self) -> None:
        """Give the stream back (where the layer does not do it when the object dies)."""


class Event(ABC):
    @abstractmethod
    def record(self, stream: Stream) -> None: ...

    @abstractmethod
    def milliseconds_since(self, earlier: "Event") -> float: ...

    def close(self) -> None:
        """Give the event back (where the layer does not do it when the object dies)."""


class CudaLayer(ABC):
    """One per process and implementation (see `cuda_layer`)."""

    name: str

    def __init__(self):
        self._primary = {}  # ordinal -> the retained primary context, kept for the process

    @abstractmethod
    def device_count(self) -> int: ...

    @abstractmethod
    def gpu(self, ordinal: int = 0) -> Gpu: ...

    @abstractmethod
    def total_memory(self, ordinal: int = 0) -> int: ...

    @abstractmethod
    def driver_version(self) -> str: ...

    @abstractmethod
    def _retain_primary(self, ordinal: int): ...

    @abstractmethod
    def _push(self, context) -> None: ...

    @abstractmethod
    def _pop(self) -> None: ...

    @contextmanager
    def current(self, ordinal: int = 0):
        """The device's primary context, current on this thread for the block."""
        if ordinal not in self._primary:
            self._primary[ordinal] = self._retain_primary(ordinal)
        self._push(self._primary[ordinal])
        try:
            yield self
        finally:
            self._pop()

    # Inside current():
    @abstractmethod
    def free_memory(self) -> int: ...

    @abstractmethod
    def stream(self) -> Stream: ...

    @abstractmethod
    def event(self) -> Event: ...

    @abstractmethod
    def device_buffer(self, nbytes: int) -> DeviceBuffer: ...

    @abstractmethod
    def pinned_buffer(self, nbytes: int) -> PinnedBuffer: ...

    @abstractmethod
    def copy_to_device(self, target: DeviceBuffer, source: np.ndarray, stream: Stream) -> None: ...

    @abstractmethod
    def copy_to_host(self, target: np.ndarray, source: DeviceBuffer, stream: Stream) -> None: ...


def format_driver_version(version: int) -> str:
    """CUDA's integer version (13000) as it is printed (13.0)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _load(name: str) -> CudaLayer:
    if name == "pycuda":
        from .cuda_pycuda import PycudaLayer

        return PycudaLayer()
    from .cuda_bindings import CudaPythonLayer

    return CudaPythonLayer()


def _import_problem(name: str, exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"{name} is not installed: {INSTALL[name]}"
    return f"{name} is installed but does not load ({one_line(exc)})"


_LAYERS = {}


def cuda_layer(preferred: str = None) -> CudaLayer:
    """The process's CUDA layer: `preferred`, else $TRUFOR_TRT_CUDA, else the first of LAYERS
    that imports. A driver that is there but answers with an error (no GPU, a driver too old)
    is final: the other layer would talk to the same driver."""
    choice = preferred or os.environ.get(LAYER_ENV) or None
    if choice is not None and choice not in LAYERS:
        raise EngineError(f"{LAYER_ENV}={choice}: choose one of {', '.join(LAYERS)}")
    problems = []
    for name in [choice] if choice else LAYERS:
        if name in _LAYERS:
            return _LAYERS[name]
        try:
            _LAYERS[name] = _load(name)
            return _LAYERS[name]
        except (ImportError, OSError) as exc:
            problems.append(_import_problem(name, exc))
    raise EngineError("no CUDA layer: " + "; ".join(problems))


def gpu_info(ordinal: int = 0) -> Gpu:
    return cuda_layer().gpu(ordinal)
