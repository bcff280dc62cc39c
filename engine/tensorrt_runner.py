"""The TensorRT backend: engines, execution contexts and one CUDA stream per runner.

A model folder may hold several engines of one precision for this GPU (profiles for small and
large images); each image runs on the smallest profile that admits it, loaded on first use.
Device buffers are sized once per engine for its profile's largest image, from the dtypes the
engine reports, and host buffers are pinned; each image is set_input_shape -> async copy in ->
execute_async_v3 -> async copies out on the runner's stream, with CUDA events between the
stages. Several runners on one engine file (one context and stream each) run concurrently.
Only APIs present in TensorRT 10.0 (JetPack 6 has 10.3) through 11.x are used.
"""

import threading
from pathlib import Path

import numpy as np

from trufor_trt.architecture import stage_grids
from trufor_trt.errors import EngineError, ImageError, RunnerFailure, one_line
from trufor_trt.files import sha256_file
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner
from trufor_trt.engine.tensorrt_plan import Sidecar, io_contract_problems, survey_engines

MISSING_TENSORRT = ('TensorRT is not installed: on a Jetson it comes with JetPack '
                    '(apt install nvidia-jetpack); elsewhere: pip install "trufor-trt[trt]"')

_LOGGER = {}
_LOGGER_LOCK = threading.Lock()


def import_tensorrt():
    """tensorrt, or an EngineError saying in one line why it cannot be used. A libnvinfer that
    fails to load raises ImportError or OSError, not ModuleNotFoundError."""
    try:
        import tensorrt
    except ModuleNotFoundError:
        raise EngineError(MISSING_TENSORRT) from None
    except (ImportError, OSError) as exc:
        raise EngineError(f"TensorRT is installed but does not load ({one_line(exc)})") from None
    return tensorrt


def tensorrt_logger(trt):
    """The process's one trt.Logger (TensorRT expects a single logger per process)."""
    with _LOGGER_LOCK:
        if "logger" not in _LOGGER:
            _LOGGER["logger"] = trt.Logger(trt.Logger.WARNING)
        return _LOGGER["logger"]


def output_shape(name: str, height: int, width: int) -> tuple:
    if name == "noiseprint":
        return (1, 1, height, width)
    return (1, 2 if name == "localization_logits" else 1, *stage_grids(height, width)[0])


def engine_io(trt, engine) -> dict:
    """name -> (mode, dtype name) of every I/O tensor of a deserialized engine."""
    tensors = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors[name] = (mode, engine.get_tensor_dtype(name).name)
    return tensors


class _LoadedEngine:
    """One deserialized engine with its context, stream, events and buffers."""

    def __init__(self, trt, cuda, runtime, path: Path, sidecar: Sidecar):
        self.profile = sidecar.profile_object()
        self.engine = runtime.deserialize_cuda_engine(sidecar.engine_bytes(path))
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {path}")
        problems = io_contract_problems(engine_io(trt, self.engine))
        if problems:
            raise EngineError(f"engine {path.name} does not match the model's inputs and outputs: "
                              + "; ".join(problems))
        self.context = self.engine.create_execution_context()
        self.stream = cuda.stream()
        self.events = [cuda.event() for _ in range(4)]
        self.dtypes = {name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                       for name in (INPUT_NAME, *OUTPUT_NAMES)}
        largest = {name: (self.profile.max_batch, *output_shape(name, *self.profile.max)[1:])
                   for name in OUTPUT_NAMES}
        largest[INPUT_NAME] = (self.profile.max_batch, 3, *self.profile.max)
        nbytes = {name: int(np.prod(shape)) * self.dtypes[name].itemsize for name, shape in largest.items()}
        self.host = {name: cuda.pinned_buffer(size) for name, size in nbytes.items()}
        self.device = {name: cuda.device_buffer(size) for name, size in nbytes.items()}
        for name, buffer in self.device.items():
            if not self.context.set_tensor_address(name, buffer.address):
                raise EngineError(f"TensorRT refused the address of tensor {name} in {path.name}")

    def run(self, cuda, prepared: np.ndarray) -> tuple:
        """([raw outputs per image], stage times in ms) of N prepared same-size images."""
        staged = self.host[INPUT_NAME].view(self.dtypes[INPUT_NAME], prepared.size)
        np.copyto(staged, prepared.ravel(), casting="same_kind")
        if not self.context.set_input_shape(INPUT_NAME, prepared.shape):
            raise EngineError(f"TensorRT refused input shape {prepared.shape}")
        start, copied_in, computed, copied_out = self.events
        start.record(self.stream)
        cuda.copy_to_device(self.device[INPUT_NAME], staged, self.stream)
        copied_in.record(self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineError("TensorRT failed to enqueue the inference")
        computed.record(self.stream)
        results = []
        for name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(name))
            host = self.host[name].view(self.dtypes[name], int(np.prod(shape)))
            cuda.copy_to_host(host, self.device[name], self.stream)
            results.append(host.reshape(shape))
        copied_out.record(self.stream)
        self.stream.synchronize()
        stages = {"host_to_device": copied_in.milliseconds_since(start),
                  "inference": computed.milliseconds_since(copied_in),
                  "device_to_host": copied_out.milliseconds_since(computed)}
        outputs = RawOutputs.from_batch(*(np.array(result, np.float32) for result in results))
        return outputs, stages

    def close(self) -> None:
        """Buffers, stream and events freed, then TensorRT's objects: the caller holds the
        context current, so every destructor runs where its memory lives."""
        for buffer in [*self.device.values(), *self.host.values()]:
            buffer.free()
        for handle in [self.stream, *self.events]:
            handle.close()
        self.device = self.host = {}
        self.context = self.engine = None


class TensorRTRunner(Runner):
    backend = "tensorrt"
    default_streams = 2  # two engines overlap their copies and kernels on one GPU

    def __init__(self, model, precision: str = "fp16", device: int = 0):
        super().__init__()
        self.model = model
        self.precision = precision
        self.device = device
        self._cuda = None
        self._survey = None
        self._loaded = {}  # engine path -> _LoadedEngine
        self._device_bytes = 0

    def load(self) -> None:
        from trufor_trt.engine.cuda_layer import cuda_layer

        trt = import_tensorrt()
        model = self.model if isinstance(self.model, ModelDir) else ModelDir.open(self.model)
        self._cuda = cuda_layer()
        gpu = self._cuda.gpu(self.device)
        self._survey = survey_engines(model.path, gpu, trt.__version__, self.precision,
                                      sha256_file(model.variant_path(self.precision)))
        why = self._survey.problem(self.precision, gpu, trt.__version__, model.path)
        if why:
            raise EngineError(why)
        self._trt = trt
        with self._cuda.current(self.device):
            self._runtime = trt.Runtime(tensorrt_logger(trt))
        self.detection_head = model.detection_head()
        self.model_sha256 = model.checkpoint_sha256
        # The engine is checked against its sidecar's SHA-256 when it is loaded; the sidecar
        # names the graph it was built from, which is one of these.
        self.model_files_sha256 = model.files_sha256([model.variant_path(self.precision).name,
                                                      model.detection_head_file])

    def _engine_for(self, height: int, width: int) -> _LoadedEngine:
        """The loaded engine of the smallest profile that admits the image (call while current)."""
        chosen = self._survey.for_image(height, width)
        if chosen is None:
            raise ImageError(f"{height}x{width}", self._survey.refusal(height, width))
        path, sidecar = chosen
        if path not in self._loaded:
            free_before = self._cuda.free_memory()
            self._loaded[path] = _LoadedEngine(self._trt, self._cuda, self._runtime, path, sidecar)
            # Weights, the context's activation memory and our buffers are all taken here.
            self._device_bytes += free_before - self._cuda.free_memory()
        return self._loaded[path]

    def refusal(self, height: int, width: int):
        return self._survey.refusal(height, width) or None

    def on_gpu(self) -> bool:
        return True

    def takes_batches(self) -> bool:
        return any(sidecar.profile_object().max_batch > 1 for _, sidecar in self._survey.usable)

    def batch_limit(self, height: int, width: int) -> int:
        chosen = self._survey.for_image(height, width)
        return chosen[1].profile_object().max_batch if chosen else 1

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        return self.infer_batch(prepared)[0]

    def infer_batch(self, prepared: np.ndarray) -> list:
        height, width = prepared.shape[2:]
        if prepared.shape[0] > self.batch_limit(height, width):
            raise ImageError(f"{height}x{width}", f"a batch of {prepared.shape[0]} is more than this "
                                                  f"size's engine takes ({self.batch_limit(height, width)})")
        try:
            with self._cuda.current(self.device) as cuda:
                outputs, self.last_stage_ms = self._engine_for(height, width).run(cuda, prepared)
        except ImageError:
            raise
        except Exception as exc:  # the image was admitted: what fails now is the engine or the GPU
            raise RunnerFailure(f"TensorRT on GPU {self.device} failed: {one_line(exc)}") from exc
        return outputs

    def device_memory_bytes(self):
        return self._device_bytes if self._cuda is not None else None

    def close(self) -> None:
        if self._cuda is None:
            return
        with self._cuda.current(self.device):
            for loaded in self._loaded.values():
                loaded.close()
            self._loaded = {}
            self._runtime = None
        self._cuda = None
