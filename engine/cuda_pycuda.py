"""The CUDA layer on pycuda (>= 2025.1.2, the first release built for CUDA 13 / JetPack 7)."""

import numpy as np

from trufor_trt.engine.cuda import CudaLayer, DeviceBuffer, Event, PinnedBuffer, Stream, format_driver_version
from trufor_trt.engine.cuda import Gpu
from trufor_trt.errors import EngineError


class _Device(DeviceBuffer):
    def __init__(self, allocation):
        self.allocation = allocation
        self.address = int(allocation)

    def free(self) -> None:
        self.allocation.free()


class _Pinned(PinnedBuffer):
    def __init__(self, array):
        self.array = array

    def free(self) -> None:
        self.array.base.free()  # the HostAllocation behind the array


class _Stream(Stream):
    def __init__(self, stream):
        self.stream = stream
        self.handle = stream.handle

    def synchronize(self) -> None:
        self.stream.synchronize()


class _Event(Event):
    def __init__(self, event):
        self.event = event

    def record(self, stream: Stream) -> None:
        self.event.record(stream.stream)

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

    def device_count(self) -> int:
        return self.driver.Device.count()

    def gpu(self, ordinal: int = 0) -> Gpu:
        device = self.driver.Device(ordinal)
        return Gpu(name=device.name(), compute_capability=tuple(device.compute_capability()),
                   integrated=bool(device.get_attribute(self.driver.device_attribute.INTEGRATED)))

    def total_memory(self, ordinal: int = 0) -> int:
        return int(self.driver.Device(ordinal).total_memory())

    def driver_version(self) -> str:
        return format_driver_version(self.driver.get_driver_version())

    def _retain_primary(self, ordinal: int):
        return self.driver.Device(ordinal).retain_primary_context()

    def _push(self, context) -> None:
        context.push()

    def _pop(self) -> None:
        self.driver.Context.pop()

    def free_memory(self) -> int:
        return int(self.driver.mem_get_info()[0])

    def stream(self) -> Stream:
        return _Stream(self.driver.Stream())

    def event(self) -> Event:
        return _Event(self.driver.Event())

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        return _Device(self.driver.mem_alloc(nbytes))

    def pinned_buffer(self, nbytes: int) -> PinnedBuffer:
        return _Pinned(self.driver.pagelocked_empty(nbytes, np.uint8))

    def copy_to_device(self, target: DeviceBuffer, source: np.ndarray, stream: Stream) -> None:
        self.driver.memcpy_htod_async(target.address, source, stream.stream)

    def copy_to_host(self, target: np.ndarray, source: DeviceBuffer, stream: Stream) -> None:
        self.driver.memcpy_dtoh_async(target, source.address, stream.stream)
