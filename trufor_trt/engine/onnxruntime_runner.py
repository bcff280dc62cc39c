"""The ONNX Runtime backend: the embedded default that runs on any CPU.

It runs the model folder's CPU graph variant (attention as com.microsoft.MultiHeadAttention,
whose flash kernel keeps memory bounded). The session settings below, and what each was
measured to buy on a 2-core CPU, are in the README ("ONNX Runtime settings").
"""

import numpy as np

from .model_dir import CPU_VARIANT, ModelDir
from .runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs, Runner


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


def create_session(graph, threads: int = 0):
    """An ONNX Runtime CPU session configured for one image at a time of varying size.
    `graph`: a path, or a serialized model (bytes)."""
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
    options.log_severity_level = 3
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session, prepared: np.ndarray) -> RawOutputs:
    outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: prepared})
    return RawOutputs.from_batch_of_one(*outputs)


def _cpu_graph(model: ModelDir, precision: str):
    """FP32: the CPU variant. FP16 / INT8: the TensorRT variant with its float16 storage
    simulated in float32 (ORT has almost no CPU float16 kernels); that needs the `export` extra."""
    if precision == "fp32":
        return model.variant_path(CPU_VARIANT)
    import onnx

    from ..export.precision import upcast_fp16

    return upcast_fp16(onnx.load(model.variant_path(precision))).SerializeToString()


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model, precision: str = "fp32", threads: int = 0):
        """`model`: a model folder's path, or a ModelDir already opened (and checked)."""
        super().__init__()
        self.model = model
        self.precision = precision
        self.threads = threads
        self.session = None

    def load(self) -> None:
        model = self.model if isinstance(self.model, ModelDir) else ModelDir.open(self.model)
        self.session = create_session(_cpu_graph(model, self.precision), self.threads)
        self.detection_head = model.detection_head()

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        return run_session(self.session, np.ascontiguousarray(prepared, dtype=np.float32))

    def close(self) -> None:
        self.session = None
