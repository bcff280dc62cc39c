"""Starting TensorRT: importing it, its one logger, and its Runtime and Builder, each failure
one line that says what to do.

What fails on real machines:
- the import (not installed; a libnvinfer that does not load raises ImportError or OSError);
- `trt.Runtime(...)` / `trt.Builder(...)` raise `TypeError: pybind11::init(): factory function
  returned nullptr` when TensorRT cannot start CUDA (NVIDIA/TensorRT#2913): typically TensorRT's
  CUDA 13 build on a driver older than 580, or no usable GPU. Importing TensorRT proves neither,
  so `doctor` and `--backend auto` create a Runtime (under the CUDA context) before they say yes.
"""

import threading

from trufor_trt.errors import EngineError, one_line

# Which TensorRT wheel a driver can run: CUDA 13 builds need driver >= 580 (NVIDIA's support
# matrix); pip's plain `tensorrt` pulls the CUDA 13 build since 10.16. A Jetson gets TensorRT
# from JetPack (6.1+: TensorRT 10.3; JetPack 6.0 has 8.6, too old for strongly typed builds).
CUDA13_MIN_DRIVER = 580
INSTALL_BY_DRIVER = ('pip install "trufor-trt[trt-cu13]" with an NVIDIA driver >= 580, '
                     '"trufor-trt[trt-cu12]" with drivers 525-575; on a Jetson TensorRT comes with '
                     'JetPack >= 6.1 (apt install nvidia-jetpack)')
MISSING_TENSORRT = f"TensorRT is not installed: {INSTALL_BY_DRIVER}"

_LOGGER = {}
_LOGGER_LOCK = threading.Lock()


def import_tensorrt():
    """tensorrt, or an EngineError saying in one line why it cannot be used."""
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


def _driver_hint(driver_version: str) -> str:
    """What to install, given the CUDA version the driver supports ("12.4"; "" if unknown)."""
    if driver_version and int(driver_version.split(".")[0]) < 13:
        return (f"this driver supports CUDA {driver_version}, which runs TensorRT's CUDA 12 builds: "
                'pip install "trufor-trt[trt-cu12]" (or a driver >= 580 for the CUDA 13 builds)')
    return (f"this driver supports CUDA {driver_version}; " if driver_version else "") + INSTALL_BY_DRIVER


def _cuda_start_failure(what: str, trt, driver_version: str, exc: BaseException) -> EngineError:
    """The one line for a Runtime or Builder that TensorRT could not create."""
    hint = _driver_hint(driver_version)
    return EngineError(f"TensorRT {getattr(trt, '__version__', '?')} could not start CUDA for its {what} "
                       f"({one_line(exc)}): the TensorRT build needs a newer driver, or no GPU is usable; "
                       f"{hint}")


def _created(what: str, factory, trt, driver_version: str):
    try:
        made = factory(tensorrt_logger(trt))
    except (TypeError, RuntimeError) as exc:  # pybind11's "factory function returned nullptr"
        raise _cuda_start_failure(what, trt, driver_version, exc) from None
    if made is None:
        raise _cuda_start_failure(what, trt, driver_version, ValueError("returned None"))
    return made


def start_runtime(trt, driver_version: str = ""):
    """A trt.Runtime; call with the CUDA context current. `driver_version`: the CUDA version the
    driver supports ("12.4"), named in the failure."""
    return _created("runtime", trt.Runtime, trt, driver_version)


def start_builder(trt, driver_version: str = ""):
    """A trt.Builder; call with the CUDA context current."""
    return _created("builder", trt.Builder, trt, driver_version)
