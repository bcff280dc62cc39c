"""The ONNX Runtime backend: the embedded default that runs on any CPU.

FP32 runs the model folder's four CPU graphs in bounded memory: Noiseprint++ in exact row
bands, the two-stream encoder on the whole image (attention as com.microsoft.MultiHeadAttention,
whose flash kernel keeps no score matrix), then both folded decoders as matrix products: the
coarse maps of a group of 1/4-grid rows, then the group in small bands (bands.py); band and
group heights follow the memory budget. The session settings below, and
what each was measured to buy on a 2-core CPU, are in docs/model-folder.md ("ONNX Runtime
settings") and docs/large-images.md.
"""

from dataclasses import dataclass

import numpy as np

from trufor_trt.architecture import stage_grids
from trufor_trt.bands import DecoderBand, DecoderGroup
from trufor_trt.engine.chain import COARSE, NOISEPRINT, ChainParts, run_chain
from trufor_trt.precision.kernel_models import SIMULATED_KERNEL_MODEL
from trufor_trt.engine.memory_budget import BandPlan, MemoryModel, physical_memory
from trufor_trt.engine.model_dir import CPU_VARIANTS, ModelDir
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner

LOGITS = list(OUTPUT_NAMES[:2])
FEATURES = ("c1", "c2", "c3", "c4")
WIDENED = tuple(f"{name}_wide" for name in COARSE)
# Peak RSS of `analyze` per image (measured with ONNX Runtime 1.31 on the 2-core CPU; docs/large-images.md).
MEMORY = MemoryModel(fixed_bytes=0.6e9, bytes_per_pixel=400, noiseprint_bytes_per_pixel=1000,
                     decoder_bytes_per_cell=16000)


_shared_arena_registered = False
ARENA_EXTEND_SAME_AS_REQUESTED = 1  # ORT's kSameAsRequested


def _register_shared_arena(ort) -> None:
    """One CPU arena for the process that grows by exactly what is asked (not the default's
    next power of two). Without an arena every large buffer is a fresh, page-faulted mmap."""
    global _shared_arena_registered
    if not _shared_arena_registered:
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                              ort.OrtMemType.DEFAULT),
            ort.OrtArenaCfg({"arena_extend_strategy": ARENA_EXTEND_SAME_AS_REQUESTED}))
        _shared_arena_registered = True


def create_session(graph, threads: int = 0, spinning: bool = True, initializers=None):
    """An ONNX Runtime CPU session configured for one image at a time of varying size.
    `graph`: a path, or a serialized model (bytes). `spinning`: idle worker threads busy-wait
    for the next operator (good for one session, bad for sessions taking turns).
    `initializers`: name -> OrtValue for the graph's external-data initializers
    (precision/weight_store.py), kept alive by the caller."""
    import onnxruntime as ort

    _register_shared_arena(ort)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads  # 0: one per physical core
    options.inter_op_num_threads = 1
    # Images change size from one call to the next: a memory pattern planned for one shape
    # does not fit the next.
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    if initializers:
        options.add_external_initializers(list(initializers), list(initializers.values()))
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session, prepared: np.ndarray) -> RawOutputs:
    """A whole-network graph: image -> logits and Noiseprint++."""
    outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: prepared})
    return RawOutputs.from_batch_of_one(*outputs)


def run_noiseprint_band(session, prepared: np.ndarray, noiseprint: np.ndarray, top: int, bottom: int,
                        first: int, last: int) -> None:
    """Noiseprint++'s rows top..bottom into `noiseprint`, from `session` (a Noiseprint++ graph)
    run on `prepared`'s rows first..last (a band of bands.noiseprint_row_bands)."""
    rows = np.ascontiguousarray(prepared[:, :, first:last])
    band = session.run([NOISEPRINT], {INPUT_NAME: rows})[0]
    noiseprint[:, :, top:bottom] = band[:, :, top - first:bottom - first]


@dataclass(frozen=True)
class CpuSessions:
    """A chain's four graphs (CPU_VARIANTS' parts, in that order), one session each."""

    noiseprint: object
    features: object
    decoder_maps: object
    decoders: object

    @classmethod
    def from_files(cls, files: dict, threads: int = 0, names=CPU_VARIANTS) -> "CpuSessions":
        """`files`: name -> path or serialized graph, for each of `names` (the chain's order)."""
        # Each session has its own thread pool; threads left spinning after one graph steal the
        # cores from the next (measured, 2 cores: 387 -> 299 ms at 256 px, 1314 -> 1246 at 512).
        return cls(*(create_session(files[name], threads, spinning=False) for name in names))

    def run(self, prepared: np.ndarray, noiseprint_rows: int, decoder_rows: int,
            parts_ms: dict | None = None) -> RawOutputs:
        """The network on one image; `parts_ms`, if given, receives each part's milliseconds."""
        return run_chain(SessionParts(self), prepared, BandPlan(noiseprint_rows, decoder_rows), parts_ms)


class SessionParts(ChainParts):
    """The chain's steps on ONNX Runtime sessions and host arrays: the four CPU graphs, or the
    TensorRT-shaped part graphs (export/chain_parts.py), which take and give the same tensors."""

    def __init__(self, sessions: CpuSessions):
        self.sessions = sessions

    def start(self, prepared: np.ndarray) -> None:
        batch, _, height, width = prepared.shape
        self.prepared = prepared
        self.noiseprint = np.empty((batch, 1, height, width), np.float32)
        grid = stage_grids(height, width)[0]
        self.logits = [np.empty((1, channels, *grid), np.float32) for channels in (2, 1)]

    def noiseprint_band(self, top: int, bottom: int, first: int, last: int) -> None:
        run_noiseprint_band(self.sessions.noiseprint, self.prepared, self.noiseprint, top, bottom, first, last)

    def encoder(self) -> None:
        maps = self.sessions.features.run(list(FEATURES), {INPUT_NAME: self.prepared, NOISEPRINT: self.noiseprint})
        self.features = dict(zip(FEATURES, maps))

    def decoder_group(self, group: DecoderGroup) -> None:
        feed = {"c1_rows": self.features["c1"][0, group.top:group.bottom]}
        feed.update({f"{name}_rows": self.features[name][0, first:last]
                     for name, (first, last) in zip(COARSE, group.coarse_rows)})
        self.widened = [scale[0] for scale in self.sessions.decoder_maps.run(list(WIDENED), feed)]

    def decoder_band(self, band: DecoderBand) -> None:
        feed = {"c1_rows": self.features["c1"][0, band.top:band.bottom]}
        for name, scale, (start, stop), matrix in zip(COARSE, self.widened, band.reads, band.vertical):
            feed.update({f"{name}_wide": scale[start:stop], f"{name}_vertical": matrix.astype(np.float32)})
        for whole, part in zip(self.logits, self.sessions.decoders.run(LOGITS, feed)):
            whole[0, :, band.top:band.bottom] = part

    def finish(self) -> RawOutputs:
        outputs = RawOutputs.from_batch_of_one(*self.logits, self.noiseprint)
        self.prepared = self.noiseprint = self.features = self.widened = self.logits = None
        return outputs


def _reduced_precision_graph(model: ModelDir, precision: str, kernel_model: str) -> bytes:
    """The TensorRT FP16 / INT8 variant with its float16 storage simulated in float32 (ORT has
    almost no CPU float16 kernels), its float16 convolutions rounding as `kernel_model` says;
    whole-image, for measurement; needs the `export` extra."""
    import onnx

    from trufor_trt.precision.fp16 import upcast_fp16

    return upcast_fp16(onnx.load(model.variant_path(precision)), kernel_model).SerializeToString()


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model, precision: str = "fp32", threads: int = 0, max_memory_bytes=None,
                 kernel_model: str = SIMULATED_KERNEL_MODEL):
        """`model`: a model folder's path, or a ModelDir already opened (and checked).
        `max_memory_bytes`: the budget the row bands are sized from (default: the machine's
        physical memory). `kernel_model`: FP16 / INT8 only, how the float16 convolutions are
        simulated (precision/fp16.py)."""
        super().__init__()
        self.model = model
        self.precision = precision
        self.kernel_model = kernel_model
        self.threads = threads
        self.max_memory_bytes = max_memory_bytes or physical_memory()
        self.session = None  # FP16 / INT8: one whole-network session
        self.cpu_sessions = None  # FP32: the three banded CPU graphs

    def load(self) -> None:
        model = self.model if isinstance(self.model, ModelDir) else ModelDir.open(self.model)
        if self.precision == "fp32":
            files = {name: model.variant_path(name) for name in CPU_VARIANTS}
            self.cpu_sessions = CpuSessions.from_files(files, self.threads)
        else:
            files = {self.precision: model.variant_path(self.precision)}
            self.session = create_session(_reduced_precision_graph(model, self.precision, self.kernel_model),
                                          self.threads)
        self.detection_head = model.detection_head()
        self.model_sha256 = model.checkpoint_sha256
        self.model_files_sha256 = model.files_sha256([path.name for path in files.values()]
                                                     + [model.detection_head_file])

    def refusal(self, height: int, width: int):
        return MEMORY.refusal(height, width, self.max_memory_bytes) if self.cpu_sessions else None

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        prepared = np.ascontiguousarray(prepared, dtype=np.float32)
        if self.cpu_sessions is None:
            return run_session(self.session, prepared)
        plan = MEMORY.plan(*prepared.shape[2:], self.max_memory_bytes)
        self.last_parts_ms = {}
        return self.cpu_sessions.run(prepared, plan.noiseprint_rows, plan.decoder_rows, self.last_parts_ms)

    def close(self) -> None:
        self.session = self.cpu_sessions = None
