"""The CUDA layer on NVIDIA's cuda-python (`cuda-bindings` >= 12.6: `cuda.bindings.driver`).

Every driver call returns (CUresult, values...); `_call` turns a failure into an EngineError.
Where there is no driver (no libcuda), the first call raises instead (RuntimeError, or its
subclass DynamicLibNotFoundError since 12.9): the layer then is not usable, said in one line.
"""

import ctypes

import numpy as np

from trufor_trt.engine.cuda import CudaLayer, DeviceBuffer, Event, PinnedBuffer, Stream, format_driver_version
from trufor_trt.engine.cuda import Gpu
from trufor_trt.errors import EngineError, one_line

NAME_BYTES = 256


def native_handle(handle) -> int:
    """The address a cuda-bindings handle (a stream, an event) stands for: through
    get_cuda_native_handle where the bindings have it (int(handle) is deprecated for handles
    since 13.0), int() on the releases before it. Device pointers are not handles: a CUdeviceptr
    is an address, and int() is its conversion on every release (get_cuda_native_handle refuses it)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(handle)
    return int(get_cuda_native_handle(handle))


class CudaPythonLayer(CudaLayer):
    name = "cuda-python"

    def __init__(self):
        super().__init__()
        from cuda.bindings import driver  # ImportError / OSError: handled by cuda_layer()

        self.cu = driver
        try:
            self._call(driver.cuInit(0))
            count = self._call(driver.cuDeviceGetCount())
        except EngineError as exc:
            raise EngineError(f"no usable CUDA driver or GPU (cuda-python): {exc}") from None
        except RuntimeError as exc:  # no libcuda: cuda-bindings raise (DynamicLibNotFoundError, 12.9+)
            raise EngineError(f"no NVIDIA GPU or driver found (cuda-python: {one_line(exc)})") from None
        if count == 0:
            raise EngineError("no CUDA GPU found: TensorRT engines are built and run on the GPU")

    def _call(self, result):
        """The values of a driver call's result, or an EngineError naming the CUDA error."""
        error, *values = result
        if error != self.cu.CUresult.CUDA_SUCCESS:
            _, text = self.cu.cuGetErrorString(error)
            raise EngineError(f"CUDA error {int(error)}: {text.decode() if text else error}")
        return values[0] if len(values) == 1 else tuple(values)

    def _device(self, ordinal: int):
        return self._call(self.cu.cuDeviceGet(ordinal))

    def _attribute(self, name: str, ordinal: int) -> int:
        attribute = getattr(self.cu.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
        return int(self._call(self.cu.cuDeviceGetAttribute(attribute, self._device(ordinal))))

    def device_count(self) -> int:
        return int(self._call(self.cu.cuDeviceGetCount()))

    def gpu(self, ordinal: int = 0) -> Gpu:
        raw = self._call(self.cu.cuDeviceGetName(NAME_BYTES, self._device(ordinal)))
        name = raw.split(b"\0", 1)[0].decode()
        capability = (self._attribute("COMPUTE_CAPABILITY_MAJOR", ordinal),
                      self._attribute("COMPUTE_CAPABILITY_MINOR", ordinal))
        return Gpu(name=name, compute_capability=capability,
                   integrated=bool(self._attribute("INTEGRATED", ordinal)))

    def total_memory(self, ordinal: int = 0) -> int:
        return int(self._call(self.cu.cuDeviceTotalMem(self._device(ordinal))))

    def driver_version(self) -> str:
        return format_driver_version(int(self._call(self.cu.cuDriverGetVersion())))

    def _retain_primary(self, ordinal: int):
        return self._call(self.cu.cuDevicePrimaryCtxRetain(self._device(ordinal)))

    def _push(self, context) -> None:
        self._call(self.cu.cuCtxPushCurrent(context))

    def _pop(self) -> None:
        self._call(self.cu.cuCtxPopCurrent())

    def free_memory(self) -> int:
        free, _total = self._call(self.cu.cuMemGetInfo())
        return int(free)

    def stream(self) -> Stream:
        return _Stream(self, self._call(self.cu.cuStreamCreate(0)))

    def event(self) -> Event:
        return _Event(self, self._call(self.cu.cuEventCreate(0)))

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        return _Device(self, self._call(self.cu.cuMemAlloc(nbytes)))

    def pinned_buffer(self, nbytes: int) -> PinnedBuffer:
        address = int(self._call(self.cu.cuMemHostAlloc(nbytes, 0)))
        return _Pinned(self, address, nbytes)

    def copy_to_device(self, target: DeviceBuffer, source: np.ndarray, stream: Stream) -> None:
        self._call(self.cu.cuMemcpyHtoDAsync(target.address, source.ctypes.data, source.nbytes,
                                             stream.stream))

    def copy_to_host(self, target: np.ndarray, source: DeviceBuffer, stream: Stream) -> None:
        self._call(self.cu.cuMemcpyDtoHAsync(target.ctypes.data, source.address, target.nbytes,
                                             stream.stream))

    def copy_on_device(self, target, source, nbytes: int, stream: Stream) -> None:
        self._call(self.cu.cuMemcpyDtoDAsync(target.address, source.address, nbytes, stream.stream))


class _Device(DeviceBuffer):
    def __init__(self, layer: CudaPythonLayer, pointer):
        self.layer, self.pointer, self.address = layer, pointer, int(pointer)

    def free(self) -> None:
        self.layer._call(self.layer.cu.cuMemFree(self.pointer))


class _Pinned(PinnedBuffer):
    def __init__(self, layer: CudaPythonLayer, address: int, nbytes: int):
        self.layer, self.address = layer, address
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))

    def free(self) -> None:
        self.array = None
        self.layer._call(self.layer.cu.cuMemFreeHost(self.address))


class _Stream(Stream):
    def __init__(self, layer: CudaPythonLayer, stream):
        self.layer, self.stream, self.handle = layer, stream, native_handle(stream)

    def synchronize(self) -> None:
        self.layer._call(self.layer.cu.cuStreamSynchronize(self.stream))

    def close(self) -> None:
        self.layer._call(self.layer.cu.cuStreamDestroy(self.stream))


class _Event(Event):
    def __init__(self, layer: CudaPythonLayer, event):
        self.layer, self.event = layer, event

    def record(self, stream: Stream) -> None:
        self.layer._call(self.layer.cu.cuEventRecord(self.event, stream.stream))

    def milliseconds_since(self, earlier: Event) -> float:
        return float(self.layer._call(self.layer.cu.cuEventElapsedTime(earlier.event, self.event)))

    def close(self) -> None:
        self.layer._call(self.layer.cu.cuEventDestroy(self.event))
