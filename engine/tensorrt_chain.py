"""TensorRT's chain of engines: images larger than one engine can hold on a small Jetson.

The steps are engine/chain.py's, run on one stream with device buffers for every hand-off:
the image and Noiseprint++ (full resolution, one channel), the encoder's four maps (channels
last, so a group or band of rows is a pointer into them), a group's widened coarse maps, the
band buffers. Nothing with 64 channels ever exists at full size. The parts' contexts share one
block of activation memory (they run one after the other), sized by the largest. Only APIs of
TensorRT 10.0 through 11.x are used; no machine with TensorRT has run this yet (docs/large-images.md).
"""

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from trufor_trt.architecture import DECODER_DIM, EMBED_DIMS, stage_grids
from trufor_trt.bands import DecoderBand, DecoderGroup
from trufor_trt.engine.chain import COARSE, NOISEPRINT, ChainParts, run_chain
from trufor_trt.engine.chain_plan import FLOAT32, PartProfile
from trufor_trt.engine.memory_budget import BandPlan
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs
from trufor_trt.engine.tensorrt_plan import Sidecar
from trufor_trt.engine.tensorrt_shared import SHARED_ENGINES, activation_bytes, check_room, deserialized
from trufor_trt.engine.timing import StageClock
from trufor_trt.engine.tensorrt_start import tensorrt_logger, tensorrt_said
from trufor_trt.errors import EngineError
from trufor_trt.files import sha256_bytes

SCALE_OF = {"c1": 0, "c2": 1, "c3": 2, "c4": 3}


def _user_managed_context(trt, engine, name: str):
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    mark = tensorrt_logger(trt).mark()
    context = engine.create_execution_context(strategy)
    if context is None:
        raise EngineError(f"TensorRT could not create an execution context for the chain's {name} "
                          f"engine{tensorrt_said(trt, mark)}")
    return context


def _give_memory(context, scratch, nbytes: int) -> None:
    if hasattr(context, "set_device_memory"):  # 10.1+; the property before
        context.set_device_memory(scratch.address, nbytes)
    else:
        context.device_memory = scratch.address


class _Part:
    """One chained engine and its context, whose activations live in the chain's shared block."""

    def __init__(self, trt, engine, name: str):
        self.name, self.engine = name, engine
        self.context = _user_managed_context(trt, engine, name)
        self.activation_bytes = activation_bytes(engine)

    def run(self, inputs: dict, outputs: dict, stream) -> None:
        """inputs: name -> (device span, shape); outputs: name -> (device span, capacity in bytes)."""
        for name, (span, shape) in inputs.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise EngineError(f"the chain's {self.name} engine refused {name} of shape {tuple(shape)}")
            self._place(name, span)
        for name, (span, capacity) in outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape) < 0 or int(np.prod(shape)) * FLOAT32 > capacity:
                raise EngineError(f"the chain's {self.name} engine makes {name} {shape}, more than its buffer holds")
            self._place(name, span)
        if not self.context.execute_async_v3(stream.handle):
            raise EngineError(f"TensorRT failed to enqueue the chain's {self.name} engine")

    def _place(self, name: str, span) -> None:
        if not self.context.set_tensor_address(name, span.address):
            raise EngineError(f"TensorRT refused the address of {name} in the chain's {self.name} engine")


def _largest(profile: PartProfile, name: str) -> int:
    return int(np.prod(profile.inputs[name][2])) * FLOAT32


class DeviceParts(ChainParts):
    """The chain's steps on the device (see the module's docstring); one image at a time."""

    def __init__(self, cuda, parts: dict, profiles: dict, max_shape: tuple):
        self.cuda, self.parts = cuda, parts
        height, width = max_shape
        grids = stage_grids(height, width)
        band = profiles["noiseprint"].inputs[INPUT_NAME][2]
        sizes = {"image": 3 * height * width * FLOAT32, "noiseprint": height * width * FLOAT32,
                 "band_in": int(np.prod(band)) * FLOAT32, "band_out": int(np.prod(band[2:])) * FLOAT32,
                 "localization_band": _largest(profiles["decoder-band"], "c1_rows") // EMBED_DIMS[0] * 2,
                 "confidence_band": _largest(profiles["decoder-band"], "c1_rows") // EMBED_DIMS[0]}
        sizes.update({name: int(np.prod(grids[scale])) * EMBED_DIMS[scale] * FLOAT32 for name, scale in SCALE_OF.items()})
        maps = profiles["decoder-maps"].inputs
        sizes.update({f"{name}_wide": maps[f"{name}_rows"][2][0] * grids[0][1] * 2 * DECODER_DIM * FLOAT32
                      for name in COARSE})
        sizes.update({f"{name}_vertical": _largest(profiles["decoder-band"], f"{name}_vertical") for name in COARSE})
        self.scratch_bytes = max(part.activation_bytes for part in parts.values())
        self.device_bytes = sum(sizes.values()) + self.scratch_bytes
        self.sizes = sizes
        cells = int(np.prod(grids[0])) * FLOAT32
        # Host side (pinned: asynchronous copies need it): the image in, the outputs out, the
        # bands' interpolation matrices in.
        self.host_sizes = {"image": sizes["image"], "noiseprint": sizes["noiseprint"], "localization": 2 * cells,
                           "confidence": cells, **{f"{name}_vertical": sizes[f"{name}_vertical"] for name in COARSE}}

    def allocate(self, path: Path, budget=None) -> None:
        """Every buffer, once, for the profile's largest image; refused first if there is no room
        (or more than `budget` bytes would be taken)."""
        check_room(self.device_bytes, self.cuda, path, budget)
        self.buffers = {name: self.cuda.device_buffer(size) for name, size in self.sizes.items()}
        self.scratch = self.cuda.device_buffer(self.scratch_bytes)
        for part in self.parts.values():
            _give_memory(part.context, self.scratch, self.scratch_bytes)
        self.stream = self.cuda.stream()
        self.host = {name: self.cuda.pinned_buffer(size) for name, size in self.host_sizes.items()}
        self.timings = []

    def start(self, prepared: np.ndarray) -> None:
        _, _, self.height, self.width = prepared.shape
        self.grid = stage_grids(self.height, self.width)
        staged = self.host["image"].view(np.float32, prepared.size)
        np.copyto(staged, prepared.ravel())
        self.cuda.copy_to_device(self.buffers["image"], staged, self.stream)
        grid_cells = int(np.prod(self.grid[0]))
        self.logits = [self.host[name].view(np.float32, channels * grid_cells).reshape(channels, *self.grid[0])
                       for name, channels in (("localization", 2), ("confidence", 1))]

    def _row_bytes(self) -> int:
        return self.width * FLOAT32

    def noiseprint_band(self, top: int, bottom: int, first: int, last: int) -> None:
        rows, row = last - first, self._row_bytes()
        for channel in range(3):  # the band's rows of each colour plane, one after the other
            self.cuda.copy_on_device(self.buffers["band_in"].at(channel * rows * row),
                                     self.buffers["image"].at((channel * self.height + first) * row),
                                     rows * row, self.stream)
        self.parts["noiseprint"].run({INPUT_NAME: (self.buffers["band_in"], (1, 3, rows, self.width))},
                                     {NOISEPRINT: (self.buffers["band_out"], self.sizes["band_out"])}, self.stream)
        self.cuda.copy_on_device(self.buffers["noiseprint"].at(top * row), self.buffers["band_out"].at((top - first) * row),
                                 (bottom - top) * row, self.stream)

    def encoder(self) -> None:
        outputs = {name: (self.buffers[name], self.sizes[name]) for name in SCALE_OF}
        self.parts["encoder"].run({INPUT_NAME: (self.buffers["image"], (1, 3, self.height, self.width)),
                                   NOISEPRINT: (self.buffers["noiseprint"], (1, 1, self.height, self.width))},
                                  outputs, self.stream)

    def _rows(self, name: str, first: int, last: int):
        """Rows [first, last) of a channels-last map: a pointer into it, and their shape."""
        scale = SCALE_OF[name]
        width, channels = self.grid[scale][1], EMBED_DIMS[scale]
        return self.buffers[name].at(first * width * channels * FLOAT32), (last - first, width, channels)

    def decoder_group(self, group: DecoderGroup) -> None:
        inputs = {"c1_rows": self._rows("c1", group.top, group.bottom)}
        inputs.update({f"{name}_rows": self._rows(name, first, last)
                       for name, (first, last) in zip(COARSE, group.coarse_rows)})
        outputs = {f"{name}_wide": (self.buffers[f"{name}_wide"], self.sizes[f"{name}_wide"]) for name in COARSE}
        self.parts["decoder-maps"].run(inputs, outputs, self.stream)

    def decoder_band(self, band: DecoderBand) -> None:
        # The previous band's matrices may still be on their way from the pinned staging.
        self.stream.synchronize()
        grid_width, wide_row = self.grid[0][1], self.grid[0][1] * 2 * DECODER_DIM * FLOAT32
        inputs = {"c1_rows": self._rows("c1", band.top, band.bottom)}
        for name, (start, stop), matrix in zip(COARSE, band.reads, band.vertical):
            staged = self.host[f"{name}_vertical"].view(np.float32, matrix.size)
            np.copyto(staged, matrix.ravel(), casting="same_kind")
            self.cuda.copy_to_device(self.buffers[f"{name}_vertical"], staged, self.stream)
            inputs[f"{name}_wide"] = (self.buffers[f"{name}_wide"].at(start * wide_row), (stop - start, grid_width,
                                                                                        2 * DECODER_DIM))
            inputs[f"{name}_vertical"] = (self.buffers[f"{name}_vertical"], matrix.shape)
        names = ("localization_band", "confidence_band")
        outputs = {output: (self.buffers[name], self.sizes[name]) for output, name in zip(OUTPUT_NAMES[:2], names)}
        self.parts["decoder-band"].run(inputs, outputs, self.stream)
        rows = band.bottom - band.top
        for logits, name in zip(self.logits, names):
            for channel in range(logits.shape[0]):
                self.cuda.copy_to_host(logits[channel, band.top:band.bottom],
                                       self.buffers[name].at(channel * rows * grid_width * FLOAT32), self.stream)

    @contextmanager
    def timed(self, clock: StageClock, stage: str):
        """Device time between two events on the stream, read once the image is finished."""
        start, end = self.cuda.event(), self.cuda.event()
        start.record(self.stream)
        yield
        end.record(self.stream)
        self.timings.append((clock, stage, start, end))

    def finish(self) -> RawOutputs:
        noiseprint = self.host["noiseprint"].view(np.float32, self.height * self.width)
        self.cuda.copy_to_host(noiseprint, self.buffers["noiseprint"], self.stream)
        self.stream.synchronize()
        for clock, stage, start, end in self.timings:
            clock.times_ms[stage] = round(end.milliseconds_since(start), 3)
            start.close()
            end.close()
        self.timings = []
        # Copies: the pinned buffers are the next image's.
        return RawOutputs(localization_logits=np.array(self.logits[0]), confidence_logits=np.array(self.logits[1]),
                          noiseprint=np.array(noiseprint.reshape(self.height, self.width)))

    def close(self) -> None:
        for buffer in [*self.buffers.values(), self.scratch, *self.host.values()]:
            buffer.free()
        self.stream.close()
        self.buffers, self.host = {}, {}


def _part_engine(trt, runtime, folder: Path, record: dict):
    """A chained engine, once its bytes are checked against the chain's sidecar."""
    path = folder / record["file"]
    data = path.read_bytes()
    if sha256_bytes(data) != record["sha256"]:
        raise EngineError(f"engine {path}: differs from the engine its chain's sidecar describes: build it again")
    return deserialized(trt, runtime, path, data)


class LoadedChain:
    """One runner's use of a chain: the shared part engines, its contexts, buffers and stream."""

    def __init__(self, trt, cuda, path: Path, sidecar: Sidecar, ordinal: int, budget=None):
        self.path, self.ordinal, self.chain = path, ordinal, sidecar.chain
        self.bands = BandPlan(**self.chain["bands"])
        self.acquired = []
        try:
            parts = {part: _Part(trt, self._acquire(trt, path / record["file"], record), part)
                     for part, record in self.chain["parts"].items()}
            profiles = {part: PartProfile(part, {name: [tuple(shape) for shape in shapes]
                                                 for name, shapes in record["profile"].items()})
                        for part, record in self.chain["parts"].items()}
            self.device = DeviceParts(cuda, parts, profiles, tuple(sidecar.profile["max"]))
            self.device.allocate(path, budget)
        except BaseException:
            self._release()
            raise
        self.device_bytes = self.device.device_bytes

    def _acquire(self, trt, part_path: Path, record: dict):
        engine = SHARED_ENGINES.acquire(part_path, self.ordinal,
                                        lambda runtime: _part_engine(trt, runtime, self.path, record))
        self.acquired.append(part_path)
        return engine

    def _release(self) -> None:
        for part_path in self.acquired:
            SHARED_ENGINES.release(part_path, self.ordinal)
        self.acquired = []

    @classmethod
    def acquire(cls, trt, cuda, path: Path, sidecar: Sidecar, ordinal: int, budget=None) -> "LoadedChain":
        """The chain of `path` in this runner's use (call while current), within `budget` bytes."""
        return cls(trt, cuda, path, sidecar, ordinal, budget)

    def run(self, cuda, prepared: np.ndarray) -> tuple:
        """(one image's raw outputs in a list, stage times in ms), as _LoadedEngine.run."""
        if prepared.shape[0] != 1:
            raise EngineError("a chain of engines takes one image at a time")
        self.last_parts_ms = {}
        outputs = run_chain(self.device, np.ascontiguousarray(prepared, np.float32), self.bands, self.last_parts_ms)
        return [outputs], {"inference": round(sum(self.last_parts_ms.values()), 3)}

    def close(self) -> None:
        self.device.close()
        self.device = None
        self._release()
