"""The CUDA layer on pycuda (>= 2025.1.2, the first release built for CUDA 13 / JetPack 7).

pycuda raises its own exceptions (driver.Error and its kinds, driver.MemoryError; Python's
MemoryError for host memory): every call here turns them into one-line EngineErrors, as the
cuda-python layer does, so a failing GPU is a reason, never a traceback.
"""

import functools

import numpy as np

from trufor_trt.engine.cuda import CudaLayer, DeviceBuffer, Event, PinnedBuffer, Stream, format_driver_version
from trufor_trt.engine.cuda import Gpu
from trufor_trt.errors import EngineError, one_line


def _is_pycuda_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__module__.startswith("pycuda")


def converted(method):
    """`method` with pycuda's exceptions raised as EngineError (one line, naming the call)."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            if not _is_pycuda_error(exc):
                raise
            raise EngineError(f"CUDA {method.__name__.strip('_')} failed (pycuda): {one_line(exc)}") from None
    return call


class _Device(DeviceBuffer):
    def __init__(self, allocation):
        self.allocation = allocation
        self.address = int(allocation)

    @converted
    def free(self) -> None:
        self.allocation.free()


class _Pinned(PinnedBuffer):
    def __init__(self, array):
        self.array = array

    @converted
    def free(self) -> None:
        self.array.base.free()  # the HostAllocation behind the array


class _Stream(Stream):
    def __init__(self, stream):
        self.stream = stream
        self.handle = stream.handle

    @converted
    def synchronize(self) -> None:
        self.stream.synchronize()


class _Event(Event):
    def __init__(self, event):
        self.event = event

    @converted
    def record(self, stream: Stream) -> None:
        self.event.record(stream.stream)

    @converted
    def milliseconds_since(self, earlier: Event) -> float:
        return self.event.time_since(earlier.event)


class PycudaLayer(CudaLayer):
    name = "pycuda"

    def __init__(self):
        super().__init__()
        import pycuda.driver as driver  # ImportError / OSError: handled by cuda_layer()

        self.driver = driver
        try:
            driver.init()
            count = driver.Device.count()
        except driver.Error as exc:
            raise EngineError(f"no usable CUDA driver or GPU (pycuda): {exc}") from None
        if count == 0:
            raise EngineError("no CUDA GPU found: TensorRT engines are built and run on the GPU")

    @converted
    def device_count(self) -> int:
        return self.driver.Device.count()

    @converted
    def gpu(self, ordinal: int = 0) -> Gpu:
        device = self.driver.Device(ordinal)
        return Gpu(name=device.name(), compute_capability=tuple(device.compute_capability()),
                   integrated=bool(device.get_attribute(self.driver.device_attribute.INTEGRATED)))

    @converted
    def total_memory(self, ordinal: int = 0) -> int:
        return int(self.driver.Device(ordinal).total_memory())

    @converted
    def driver_version(self) -> str:
        return format_driver_version(self.driver.get_driver_version())

    @converted
    def _retain_primary(self, ordinal: int):
        return self.driver.Device(ordinal).retain_primary_context()

    @converted
    def _push(self, context) -> None:
        context.push()

    @converted
    def _pop(self) -> None:
        self.driver.Context.pop()

    @converted
    def free_memory(self) -> int:
        return int(self.driver.mem_get_info()[0])

    @converted
    def stream(self) -> Stream:
        return _Stream(self.driver.Stream())

    @converted
    def event(self) -> Event:
        return _Event(self.driver.Event())

    @converted
    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        return _Device(self.driver.mem_alloc(nbytes))

    @converted
    def pinned_buffer(self, nbytes: int) -> PinnedBuffer:
        return _Pinned(self.driver.pagelocked_empty(nbytes, np.uint8))

    @converted
    def copy_to_device(self, target: DeviceBuffer, source: np.ndarray, stream: Stream) -> None:
        self.driver.memcpy_htod_async(target.address, source, stream.stream)

    @converted
    def copy_to_host(self, target: np.ndarray, source: DeviceBuffer, stream: Stream) -> None:
        self.driver.memcpy_dtoh_async(target, source.address, stream.stream)

    @converted
    def copy_on_device(self, target, source, nbytes: int, stream: Stream) -> None:
        self.driver.memcpy_dtod_async(target.address, source.address, nbytes, stream.stream)
