"""The TensorRT backend: one engine, one execution context and one CUDA stream per runner.

Device buffers are sized once for the profile's largest image and host buffers are pinned;
each image is set_input_shape -> set_tensor_address -> async copy in -> execute_async_v3 ->
async copies out on the runner's stream, with CUDA events between the stages. Several runners
on one engine (one context and stream each) run concurrently. Only APIs present in TensorRT
10.3 (JetPack 6) and 11.x are used (the tensor-name API replaced bindings in 10.0).
"""

from pathlib import Path

import numpy as np

from ..architecture import stage_grids
from ..errors import ImageError
from .model_dir import ModelDir, sha256_file
from .runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner
from .tensorrt_plan import EngineError, Sidecar, build_command, find_engines, sidecar_path

FLOAT_BYTES = 4
MISSING_TENSORRT = ('TensorRT is not installed: on a Jetson it comes with JetPack '
                    '(apt install nvidia-jetpack); elsewhere: pip install "trufor-trt[trt]"')


def import_tensorrt():
    """tensorrt, or an EngineError saying how to get it."""
    try:
        import tensorrt
    except ModuleNotFoundError:
        raise EngineError(MISSING_TENSORRT) from None
    return tensorrt


def output_shape(name: str, height: int, width: int) -> tuple:
    if name == "noiseprint":
        return (1, 1, height, width)
    return (1, 2 if name == "localization_logits" else 1, *stage_grids(height, width)[0])


def choose_engine(model: ModelDir, gpu, tensorrt_version: str, precision: str) -> Path:
    engines = find_engines(model.path, gpu, tensorrt_version, precision)
    if not engines:
        raise EngineError(f"no {precision} engine for {gpu.name} and TensorRT {tensorrt_version} "
                          f"in {model.path}: run `trufor-trt build --model {model.path} --{precision}`")
    return engines[-1]


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, model, precision: str = "fp16", device: int = 0):
        super().__init__()
        self.model = model
        self.precision = precision
        self.device = device
        self._context_guard = None

    def _checked_engine(self, trt, model: ModelDir, gpu) -> tuple:
        path = choose_engine(model, gpu, trt.__version__, self.precision)
        sidecar = Sidecar.read(sidecar_path(path))
        why = sidecar.mismatch(gpu, trt.__version__, sha256_file(model.variant_path(sidecar.precision)))
        if why:
            raise EngineError(f"engine {path.name} cannot run here ({why}): "
                              f"{build_command(model.path, sidecar.precision, sidecar.profile_object())}")
        return path, sidecar

    def load(self) -> None:
        from .cuda import PrimaryContext, gpu_info

        trt = import_tensorrt()
        model = self.model if isinstance(self.model, ModelDir) else ModelDir.open(self.model)
        gpu = gpu_info(self.device)
        path, sidecar = self._checked_engine(trt, model, gpu)
        self._context_guard = PrimaryContext(self.device).__enter__()
        with self._context_guard.current() as cuda:
            free_before = cuda.mem_get_info()[0]
            self._allocate(trt, cuda, path, sidecar)
            # Weights, the context's activation memory and our buffers are all taken here.
            self._device_bytes = free_before - cuda.mem_get_info()[0]
        self.detection_head = model.detection_head()

    def _allocate(self, trt, cuda, path: Path, sidecar: Sidecar) -> None:
        self.profile = sidecar.profile_object()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not load {path}")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        largest = {name: output_shape(name, *self.profile.max) for name in OUTPUT_NAMES}
        largest[INPUT_NAME] = (1, 3, *self.profile.max)
        self._host = {name: cuda.pagelocked_empty(int(np.prod(shape)), np.float32)
                      for name, shape in largest.items()}
        self._device = {name: cuda.mem_alloc(int(np.prod(shape)) * FLOAT_BYTES)
                        for name, shape in largest.items()}
        for name, buffer in self._device.items():
            self._context.set_tensor_address(name, int(buffer))

    def refusal(self, height: int, width: int):
        return None if self.profile.admits(height, width) else self.profile.refusal(height, width)

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        height, width = prepared.shape[2:]
        if prepared.shape[0] != 1 or not self.profile.admits(height, width):
            raise ImageError(f"{height}x{width}", self.profile.refusal(height, width))
        with self._context_guard.current() as cuda:
            return self._run(cuda, prepared)

    def _run(self, cuda, prepared: np.ndarray) -> RawOutputs:
        staged = self._host[INPUT_NAME][:prepared.size]
        np.copyto(staged, prepared.ravel())
        self._context.set_input_shape(INPUT_NAME, prepared.shape)
        start, copied_in, computed, copied_out = self._events
        start.record(self._stream)
        cuda.memcpy_htod_async(self._device[INPUT_NAME], staged, self._stream)
        copied_in.record(self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineError("TensorRT failed to enqueue the inference")
        computed.record(self._stream)
        results = []
        for name in OUTPUT_NAMES:
            shape = tuple(self._context.get_tensor_shape(name))
            host = self._host[name][:int(np.prod(shape))]
            cuda.memcpy_dtoh_async(host, self._device[name], self._stream)
            results.append(host.reshape(shape))
        copied_out.record(self._stream)
        self._stream.synchronize()
        self.last_stage_ms = {"host_to_device": copied_in.time_since(start),
                              "inference": computed.time_since(copied_in),
                              "device_to_host": copied_out.time_since(computed)}
        return RawOutputs.from_batch_of_one(*(result.copy() for result in results))

    def device_memory_bytes(self):
        return self._device_bytes if self._context_guard is not None else None

    def close(self) -> None:
        if self._context_guard is None:
            return
        with self._context_guard.current():
            for buffer in self._device.values():
                buffer.free()
            self._device, self._host = {}, {}
            self._stream = self._events = None
            self._context = self._engine = self._runtime = None
        self._context_guard.__exit__(None, None, None)
        self._context_guard = None
