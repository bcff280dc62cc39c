"""The CUDA layer's interface: the little of CUDA that the TensorRT runner and builder need,
implemented by pycuda (cuda_pycuda.py, the `trt-cu13` / `trt-cu12` extras) and by NVIDIA's
cuda-python (cuda_bindings.py, the `trt-cu13-cuda-python` / `trt-cu12-cuda-python` extras;
TensorRT's own samples use it since 10.14, and it needs no compiler on a Jetson); cuda_layer.py
picks one.

Each layer retains a device's primary context (the one the CUDA runtime and TensorRT use) once
per process and keeps it; `current()` makes it current on the calling thread for one call, so
runners work from any thread.
"""

import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple
    integrated: bool

    def key(self, tensorrt_version: str) -> str:
        """The folder name of this GPU's engines for one TensorRT release."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        major, minor = self.compute_capability
        return f"{slug}-sm{major}{minor}-trt{tensorrt_version}"


class DeviceBuffer(ABC):
    address: int

    @abstractmethod
    def free(self) -> None: ...

    def at(self, offset: int) -> "DeviceSpan":
        """The memory `offset` bytes into this buffer, as the copies and TensorRT take it."""
        return DeviceSpan(self.address + offset)


@dataclass(frozen=True)
class DeviceSpan:
    """Device memory inside a buffer (not owned): a chained part's rows of a hand-off buffer."""

    address: int


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

    @abstractmethod
    def copy_on_device(self, target, source, nbytes: int, stream: Stream) -> None:
        """`nbytes` from `source` to `target` (DeviceBuffer or DeviceSpan), on the stream."""


def format_driver_version(version: int) -> str:
    """CUDA's integer version (13000) as it is printed (13.0)."""
    return f"{version // 1000}.{version % 1000 // 10}"
