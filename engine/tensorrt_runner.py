"""The TensorRT backend: engines, execution contexts and one CUDA stream per runner.

A model folder may hold several engines of one precision for this GPU (profiles for small and
large images); each image runs on the smallest profile that admits it, loaded on first use.
Device buffers are sized once per engine for its profile's largest image, from the dtypes the
engine reports, and host buffers are pinned; each image is set_input_shape -> async copy in ->
execute_async_v3 -> async copies out on the runner's stream, with CUDA events between the
stages. Several runners on one engine file (one context and stream each) run concurrently.
Only APIs present in TensorRT 10.0 (JetPack 6.1 has 10.3) through 11.x are used.
"""

import threading
from pathlib import Path

import numpy as np

from trufor_trt.architecture import stage_grids
from trufor_trt.errors import EngineError, ImageError, RunnerFailure, one_line
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner
from trufor_trt.engine.tensorrt_plan import Sidecar, io_contract_problems, survey_engines
from trufor_trt.engine.tensorrt_start import import_tensorrt, start_runtime


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


def _check_profile(engine, profile, path: Path) -> None:
    """The engine's own optimization profile must be the one its sidecar names (the buffers are
    sized from the sidecar's)."""
    built = tuple(tuple(int(side) for side in shape) for shape in engine.get_tensor_profile_shape(INPUT_NAME, 0))
    if built != tuple(tuple(shape) for shape in profile.input_shapes()):
        raise EngineError(f"engine {path.name}: its profile {built} is not the one its sidecar names "
                          f"({profile.input_shapes()}): build it again")


def _memory_shortfall(engine, cuda) -> str:
    """How much device memory the engine's activations need against what is free, in words."""
    return _shortfall(_activation_bytes(engine), cuda.free_memory())


def _shortfall(needed: int, free: int) -> str:
    return (f"it needs {needed / 2 ** 30:.2f} GiB of device memory and {free / 2 ** 30:.2f} GiB are free "
            "(other runners and processes hold the rest): run fewer runners (--streams 1) or build an "
            "engine with a smaller --max-shape")


def _check_room(needed: int, cuda, path: Path) -> None:
    """Refuse, before anything is allocated, a runner the device has no room for (on a Jetson
    the GPU's memory is the CPU's too, and running out there takes the whole machine down)."""
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

    def acquire(self, trt, path: Path, sidecar: Sidecar, ordinal: int):
        """The engine of `path` (deserialized and checked by its first user); call while current."""
        with self._lock:
            key = (ordinal, str(path))
            if key not in self._engines:
                self._engines[key] = [_deserialized(trt, self._runtimes[ordinal], path, sidecar), 0]
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


def _deserialized(trt, runtime, path: Path, sidecar: Sidecar):
    """The engine of `path`, checked against the model's I/O and the sidecar's profile."""
    engine = runtime.deserialize_cuda_engine(sidecar.engine_bytes(path))
    if engine is None:
        raise EngineError(f"TensorRT could not load {path}")
    problems = io_contract_problems(engine_io(trt, engine))
    if problems:
        raise EngineError(f"engine {path.name} does not match the model's inputs and outputs: "
                          + "; ".join(problems))
    _check_profile(engine, sidecar.profile_object(), path)
    return engine


def _activation_bytes(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # 10.1+; the older name before
    return int(engine.device_memory_size if size is None else size)


class _LoadedEngine:
    """One runner's use of a shared engine: its execution context, stream, events and buffers."""

    def __init__(self, trt, cuda, engine, path: Path, sidecar: Sidecar):
        self.profile, self.engine, self.path = sidecar.profile_object(), engine, path
        self.dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
                       for name in (INPUT_NAME, *OUTPUT_NAMES)}
        largest = {name: (self.profile.max_batch, *output_shape(name, *self.profile.max)[1:])
                   for name in OUTPUT_NAMES}
        largest[INPUT_NAME] = (self.profile.max_batch, 3, *self.profile.max)
        self.nbytes = {name: int(np.prod(shape)) * self.dtypes[name].itemsize for name, shape in largest.items()}
        # What this runner takes on the device: the context's activations and its buffers.
        self.device_bytes = _activation_bytes(engine) + sum(self.nbytes.values())
        _check_room(self.device_bytes, cuda, path)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {path.name}: "
                              f"{_memory_shortfall(engine, cuda)}")
        self.stream = cuda.stream()
        self.events = [cuda.event() for _ in range(4)]
        self.host = {name: cuda.pinned_buffer(size) for name, size in self.nbytes.items()}
        self.device = {name: cuda.device_buffer(size) for name, size in self.nbytes.items()}
        for name, buffer in self.device.items():
            if not self.context.set_tensor_address(name, buffer.address):
                raise EngineError(f"TensorRT refused the address of tensor {name} in {path.name}")

    def run(self, cuda, prepared: np.ndarray) -> tuple:
        """([raw outputs per image], stage times in ms) of N prepared same-size images."""
        staged = self.host[INPUT_NAME].view(self.dtypes[INPUT_NAME], prepared.size)
        np.copyto(staged, prepared.ravel(), casting="same_kind")
        if not self.context.set_input_shape(INPUT_NAME, prepared.shape):
            raise EngineError(f"TensorRT refused input shape {prepared.shape}")
        shapes = self._output_shapes(prepared.shape)
        start, copied_in, computed, copied_out = self.events
        start.record(self.stream)
        cuda.copy_to_device(self.device[INPUT_NAME], staged, self.stream)
        copied_in.record(self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineError("TensorRT failed to enqueue the inference")
        computed.record(self.stream)
        results = []
        for name, shape in shapes.items():
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

    def _output_shapes(self, input_shape: tuple) -> dict:
        """Each output's shape for this input, as the engine reports it, checked against the
        buffer it is written to before anything runs (an engine whose shapes are not the model's
        would otherwise write past it)."""
        shapes = {}
        for name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(name))
            expected = (input_shape[0], *output_shape(name, *input_shape[2:])[1:])
            if shape != expected:
                raise EngineError(f"the engine's {name} is {shape} for input {tuple(input_shape)}, "
                                  f"the model's is {expected}: build the engine again")
            shapes[name] = shape
        return shapes

    def close(self) -> None:
        """Buffers, stream and events freed, then TensorRT's objects: the caller holds the
        context current, so every destructor runs where its memory lives."""
        for buffer in [*self.device.values(), *self.host.values()]:
            buffer.free()
        for handle in [self.stream, *self.events]:
            handle.close()
        self.device = self.host = {}
        self.context = self.engine = None  # the context dies here; the shared engine with its last user


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, model, precision: str = "fp16", device: int = 0, accept_unvalidated: bool = False,
                 engine=None):
        """`accept_unvalidated`: also run FP16 / INT8 engines never validated on their GPU, or
        validated over budget; `engine`: that engine file alone (build's validation of it)."""
        super().__init__()
        self.model = model
        self.precision = precision
        self.device = device
        self.accept_unvalidated = accept_unvalidated
        self.engine = engine
        self._cuda = None
        self._survey = None
        self._loaded = {}  # engine path -> _LoadedEngine

    @property
    def default_streams(self) -> int:
        """Two runners overlap their copies and kernels on a discrete GPU; on an integrated one (a
        Jetson) one, whose device memory is the CPU's too."""
        from trufor_trt.engine.cuda_layer import cuda_layer

        try:
            return 1 if cuda_layer().gpu(self.device).integrated else 2
        except EngineError:
            return 1

    def load(self) -> None:
        from trufor_trt.engine.cuda_layer import cuda_layer

        trt = import_tensorrt()
        model = self.model if isinstance(self.model, ModelDir) else ModelDir.open(self.model)
        self._cuda = cuda_layer()
        gpu = self._cuda.gpu(self.device)
        self._survey = survey_engines(model.path, gpu, trt.__version__, self.precision,
                                      model.variant_sha256(self.precision), self.accept_unvalidated, self.engine)
        why = self._survey.problem(self.precision, gpu, trt.__version__, model.path)
        if why:
            raise EngineError(why)
        self._trt = trt
        with self._cuda.current(self.device) as cuda:
            SHARED_ENGINES.runtime(trt, cuda, self.device)
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
            engine = SHARED_ENGINES.acquire(self._trt, path, sidecar, self.device)
            try:
                self._loaded[path] = _LoadedEngine(self._trt, self._cuda, engine, path, sidecar)
            except BaseException:
                SHARED_ENGINES.release(path, self.device)
                raise
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
        """What this runner's contexts and buffers take (the engines' weights, shared between the
        runners of a process, are not counted per runner)."""
        if self._cuda is None:
            return None
        return sum(loaded.device_bytes for loaded in self._loaded.values())

    def close(self) -> None:
        if self._cuda is None:
            return
        with self._cuda.current(self.device):
            for path, loaded in self._loaded.items():
                loaded.close()
                SHARED_ENGINES.release(path, self.device)
            self._loaded = {}
        self._cuda = None
