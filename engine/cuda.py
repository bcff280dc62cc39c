"""The CUDA layer (pycuda), kept to what the TensorRT runner and builder need.

It uses the device's primary context (the one the CUDA runtime and TensorRT use too), not
pycuda.autoinit's private context: retained and pushed on open, popped and released on close.
"""

from contextlib import contextmanager

from .tensorrt_plan import EngineError, Gpu


def _driver():
    try:
        import pycuda.driver as driver
    except ModuleNotFoundError:
        raise EngineError('pycuda is not installed: pip install "trufor-trt[trt]" '
                          "(it builds against the local CUDA toolkit)") from None
    try:
        driver.init()
        if driver.Device.count() == 0:
            raise EngineError("no CUDA GPU found: TensorRT engines are built and run on the GPU")
    except driver.Error as exc:
        raise EngineError(f"no usable CUDA driver or GPU: {exc}") from None
    return driver


def gpu_info(ordinal: int = 0) -> Gpu:
    driver = _driver()
    device = driver.Device(ordinal)
    return Gpu(name=device.name(), compute_capability=device.compute_capability(),
               integrated=bool(device.get_attribute(driver.device_attribute.INTEGRATED)))


class PrimaryContext:
    """The primary context of one GPU: retained while open, made current on the calling thread
    only inside `current()`, so runners may be used from any thread."""

    def __init__(self, ordinal: int = 0):
        self.driver = _driver()
        self.device = self.driver.Device(ordinal)
        self.context = None

    def __enter__(self) -> "PrimaryContext":
        self.context = self.device.retain_primary_context()
        return self

    @contextmanager
    def current(self):
        self.context.push()
        try:
            yield self.driver
        finally:
            self.driver.Context.pop()

    def __exit__(self, *exc_info) -> None:
        if self.context is not None:
            self.context.detach()
            self.context = None
