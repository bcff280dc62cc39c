"""What every TensorRT runner on a GPU shares: the process's deserialized engines (one per file
and GPU, each runner with its own contexts), the device memory an engine's contexts take, and
the room check made before anything is allocated."""

import threading
from pathlib import Path

from trufor_trt.engine.tensorrt_start import start_runtime, tensorrt_logger, tensorrt_said
from trufor_trt.errors import EngineError


def memory_shortfall(engine, cuda) -> str:
    """How much device memory the engine's activations need against what is free, in words."""
    return _shortfall(activation_bytes(engine), cuda.free_memory())


def _shortfall(needed: int, free: int) -> str:
    return (f"it needs {needed / 2 ** 30:.2f} GiB of device memory and {free / 2 ** 30:.2f} GiB are free "
            "(other runners and processes hold the rest): run fewer runners (--streams 1) or build an "
            "engine with a smaller --max-shape")


def check_room(needed: int, cuda, path: Path, budget=None) -> None:
    """Refuse, before anything is allocated, a runner the device has no room for (on a Jetson
    the GPU's memory is the CPU's too, and running out there takes the whole machine down), or
    that would take more than `budget` bytes (--max-memory)."""
    if budget is not None and needed > budget:
        raise EngineError(f"engine {path.name} needs {needed / 2 ** 30:.2f} GiB of device memory, more than "
                          f"--max-memory {budget / 2 ** 30:.2f} GiB: build it with a smaller --max-shape, or "
                          "as a chain (build --layout chain --max-memory)")
    free = cuda.free_memory()
    if needed > free:
        raise EngineError(f"engine {path.name} cannot run here now: {_shortfall(needed, free)}")


class _SharedEngines:
    """The process's deserialized engines, one per engine file and GPU, shared by every runner on
    it (each with its own execution context and stream): N runners hold the weights once, which
    on a Jetson's shared memory is what decides whether a second runner fits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._engines = {}  # (ordinal, path) -> [engine, users]
        self._runtimes = {}  # ordinal -> trt.Runtime, kept for the process (engines must not outlive it)

    def runtime(self, trt, cuda, ordinal: int):
        """The GPU's one Runtime (EngineError where TensorRT cannot start CUDA); call while current."""
        with self._lock:
            if ordinal not in self._runtimes:
                self._runtimes[ordinal] = start_runtime(trt, cuda.driver_version())
            return self._runtimes[ordinal]

    def acquire(self, path: Path, ordinal: int, deserialize):
        """The engine of `path`, made by its first user's `deserialize(runtime)` (which checks it);
        call while current."""
        with self._lock:
            key = (ordinal, str(path))
            if key not in self._engines:
                self._engines[key] = [deserialize(self._runtimes[ordinal]), 0]
            self._engines[key][1] += 1
            return self._engines[key][0]

    def release(self, path: Path, ordinal: int) -> None:
        """One user fewer; the last one's release destroys the engine (call while current)."""
        with self._lock:
            entry = self._engines[(ordinal, str(path))]
            entry[1] -= 1
            if entry[1] == 0:
                del self._engines[(ordinal, str(path))]


SHARED_ENGINES = _SharedEngines()


def deserialized(trt, runtime, path: Path, data: bytes):
    """The engine in `data` (the checked bytes of `path`)."""
    mark = tensorrt_logger(trt).mark()
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"TensorRT could not load {path}{tensorrt_said(trt, mark)}")
    return engine


def activation_bytes(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # 10.1+; the older name before
    return int(engine.device_memory_size if size is None else size)
