"""The TensorRT backend: engines, execution contexts and one CUDA stream per runner.

A model folder may hold several engines of one precision for this GPU (profiles for small and
large images); each image runs on the smallest profile that admits it, loaded on first use.
Device buffers are sized once per engine for its profile's largest image, from the dtypes the
engine reports, and host buffers are pinned; each image is set_input_shape -> async copy in ->
execute_async_v3 -> async copies out on the runner's stream, with CUDA events between the
stages. Several runners on one engine file (one context and stream each) run concurrently.
Images beyond every whole-image engine's profile go to a chain of engines, where one was built
(tensorrt_chain.py). Only APIs present in TensorRT 10.0 (JetPack 6.1 has 10.3) through 11.x are used.
"""

from pathlib import Path

import numpy as np

from trufor_trt.architecture import stage_grids
from trufor_trt.errors import EngineError, ImageError, RunnerFailure, one_line
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner
from trufor_trt.engine.tensorrt_chain import LoadedChain
from trufor_trt.engine.tensorrt_plan import Sidecar, io_contract_problems, survey_engines
from trufor_trt.engine.tensorrt_shared import (SHARED_ENGINES, activation_bytes, check_room, deserialized,
                                               memory_shortfall)
from trufor_trt.engine.tensorrt_start import import_tensorrt, tensorrt_logger, tensorrt_said


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


def _deserialized(trt, runtime, path: Path, sidecar: Sidecar):
    """The engine of `path`, checked against the model's I/O and the sidecar's profile."""
    engine = deserialized(trt, runtime, path, sidecar.engine_bytes(path))
    problems = io_contract_problems(engine_io(trt, engine))
    if problems:
        raise EngineError(f"engine {path.name} does not match the model's inputs and outputs: "
                          + "; ".join(problems))
    _check_profile(engine, sidecar.profile_object(), path)
    return engine


class _LoadedEngine:
    """One runner's use of a shared engine: its execution context, stream, events and buffers."""

    @classmethod
    def acquire(cls, trt, cuda, path: Path, sidecar: Sidecar, ordinal: int, budget=None) -> "_LoadedEngine":
        """The shared engine of `path` in this runner's use (call while current); `budget`:
        the most device bytes it may take."""
        engine = SHARED_ENGINES.acquire(path, ordinal, lambda runtime: _deserialized(trt, runtime, path, sidecar))
        try:
            return cls(trt, cuda, engine, path, sidecar, ordinal, budget)
        except BaseException:
            SHARED_ENGINES.release(path, ordinal)
            raise

    def __init__(self, trt, cuda, engine, path: Path, sidecar: Sidecar, ordinal: int, budget=None):
        self.profile, self.engine, self.path, self.ordinal = sidecar.profile_object(), engine, path, ordinal
        self.dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
                       for name in (INPUT_NAME, *OUTPUT_NAMES)}
        largest = {name: (self.profile.max_batch, *output_shape(name, *self.profile.max)[1:])
                   for name in OUTPUT_NAMES}
        largest[INPUT_NAME] = (self.profile.max_batch, 3, *self.profile.max)
        self.nbytes = {name: int(np.prod(shape)) * self.dtypes[name].itemsize for name, shape in largest.items()}
        # What this runner takes on the device: the context's activations and its buffers.
        self.device_bytes = activation_bytes(engine) + sum(self.nbytes.values())
        check_room(self.device_bytes, cuda, path, budget)
        mark = tensorrt_logger(trt).mark()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {path.name}: "
                              f"{memory_shortfall(engine, cuda)}{tensorrt_said(trt, mark)}")
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
        SHARED_ENGINES.release(self.path, self.ordinal)


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, model, precision: str = "fp16", device: int = 0, accept_unvalidated: bool = False,
                 engine=None, max_memory_bytes=None):
        """`accept_unvalidated`: also run FP16 / INT8 engines never validated on their GPU, or
        validated over budget; `engine`: that engine file (or chain folder) alone (build's
        validation of it); `max_memory_bytes`: the most device memory an engine or chain may take."""
        super().__init__()
        self.max_memory_bytes = max_memory_bytes
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
            kind = LoadedChain if sidecar.chain else _LoadedEngine
            self._loaded[path] = kind.acquire(self._trt, self._cuda, path, sidecar, self.device,
                                              self.max_memory_bytes)
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
                loaded = self._engine_for(height, width)
                outputs, self.last_stage_ms = loaded.run(cuda, prepared)
                self.last_parts_ms = getattr(loaded, "last_parts_ms", {})
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
            for loaded in self._loaded.values():
                loaded.close()
            self._loaded = {}
        self._cuda = None
