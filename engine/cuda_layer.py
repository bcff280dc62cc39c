"""Which CUDA layer (engine/cuda.py) this process uses: pycuda first, else cuda-python;
`TRUFOR_TRT_CUDA=pycuda|cuda-python` chooses one. Broken installs (a libcuda that fails to load
raises OSError or ImportError, not ModuleNotFoundError) become one-line EngineErrors.
"""

import os

from trufor_trt.engine.cuda import CudaLayer, Gpu
from trufor_trt.errors import EngineError, one_line

LAYER_ENV = "TRUFOR_TRT_CUDA"
LAYERS = ("pycuda", "cuda-python")
INSTALL = {"pycuda": 'pip install "trufor-trt[trt-cu13]" or "[trt-cu12]" by driver (pycuda builds against '
                     'the local CUDA toolkit: nvcc must be on PATH, on a Jetson /usr/local/cuda/bin)',
           "cuda-python": 'pip install "trufor-trt[trt-cu13-cuda-python]" or "[trt-cu12-cuda-python]" by driver'}


def _load(name: str) -> CudaLayer:
    if name == "pycuda":
        from trufor_trt.engine.cuda_pycuda import PycudaLayer

        return PycudaLayer()
    from trufor_trt.engine.cuda_bindings import CudaPythonLayer

    return CudaPythonLayer()


def _import_problem(name: str, exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"{name} is not installed: {INSTALL[name]}"
    return f"{name} is installed but does not load ({one_line(exc)})"


_LAYERS = {}


def cuda_layer(preferred: str = None) -> CudaLayer:
    """The process's CUDA layer: `preferred`, else $TRUFOR_TRT_CUDA, else the first of LAYERS
    that imports. A driver that is there but answers with an error (no GPU, a driver too old)
    is final: the other layer would talk to the same driver."""
    choice = preferred or os.environ.get(LAYER_ENV) or None
    if choice is not None and choice not in LAYERS:
        raise EngineError(f"{LAYER_ENV}={choice}: choose one of {', '.join(LAYERS)}")
    problems = []
    for name in [choice] if choice else LAYERS:
        if name in _LAYERS:
            return _LAYERS[name]
        try:
            _LAYERS[name] = _load(name)
            return _LAYERS[name]
        except (ImportError, OSError) as exc:
            problems.append(_import_problem(name, exc))
    raise EngineError("no CUDA layer: " + "; ".join(problems))


def gpu_info(ordinal: int = 0) -> Gpu:
    return cuda_layer().gpu(ordinal)


NO_DRIVER = "no NVIDIA GPU or driver found"


def nvidia_driver_problem() -> str:
    """Why no NVIDIA driver can be used here ("" where its library loads): said before anything
    about TensorRT or CUDA packages, which cannot help on such a machine. The driver's user-space
    library is what every CUDA program loads first (on a Jetson too)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return f"{NO_DRIVER} (libcuda.so.1, the driver's library, is not on this machine)"
    return ""
