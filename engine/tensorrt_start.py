"""Starting TensorRT: importing it, its one logger, and its Runtime and Builder, each failure
one line that says what to do.

What fails on real machines:
- the import (not installed; a libnvinfer that does not load raises ImportError or OSError);
- `trt.Runtime(...)` / `trt.Builder(...)` raise `TypeError: pybind11::init(): factory function
  returned nullptr` when TensorRT cannot start CUDA (NVIDIA/TensorRT#2913): typically TensorRT's
  CUDA 13 build on a driver older than 580, or no usable GPU. Importing TensorRT proves neither,
  so `doctor` and `--backend auto` create a Runtime (under the CUDA context) before they say yes.
"""

import sys
import threading

from trufor_trt.errors import EngineError, one_line
from trufor_trt.installed import install_command

# Which TensorRT wheel a driver can run: CUDA 13 builds need driver >= 580 (NVIDIA's support
# matrix); pip's plain `tensorrt` pulls the CUDA 13 build since 10.16. A Jetson gets TensorRT
# from JetPack (6.1+: TensorRT 10.3; JetPack 6.0 has 8.6, too old for strongly typed builds).
CUDA13_MIN_DRIVER = 580
INSTALL_BY_DRIVER = (f"{install_command('tensorrt')}; on a Jetson TensorRT comes with JetPack >= 6.1 "
                     "(apt install nvidia-jetpack)")
MISSING_TENSORRT = f"TensorRT is not installed: {INSTALL_BY_DRIVER}"

_LOGGER = {}
_LOGGER_LOCK = threading.Lock()


def import_tensorrt():
    """tensorrt, or an EngineError saying in one line why it cannot be used."""
    try:
        import tensorrt
    except ModuleNotFoundError:
        from trufor_trt.engine.cuda_layer import nvidia_driver_problem

        driver = nvidia_driver_problem()  # then the first thing to know: no package helps here
        raise EngineError(f"{driver}; {MISSING_TENSORRT}" if driver else MISSING_TENSORRT) from None
    except (ImportError, OSError) as exc:
        raise EngineError(f"TensorRT is installed but does not load ({one_line(exc)})") from None
    return tensorrt


def _logger_class(trt):
    """The project's ILogger: TensorRT's warnings and errors on stderr (never stdout, where
    `doctor --json` writes; trt.Logger prints to stdout), the last ones kept for the reasons."""

    class ProjectLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.severity = trt.ILogger.Severity
            self.lock = threading.Lock()
            self.heard = 0
            self.last = {}  # "error" / "warning" -> (the count when heard, the message)

        def log(self, severity, msg):
            if int(severity) > int(self.severity.WARNING):
                return
            kind = "warning" if severity == self.severity.WARNING else "error"
            text = " ".join(str(msg).split())
            with self.lock:
                self.heard += 1
                self.last[kind] = (self.heard, text)
            print(f"TensorRT {kind}: {text}", file=sys.stderr, flush=True)

        def mark(self) -> int:
            """A point to ask `said_since` about (before a call that may fail)."""
            return self.heard

        def said_since(self, mark: int) -> str:
            """The last error TensorRT logged after `mark`, else its last warning ('' if none)."""
            for kind in ("error", "warning"):
                count, text = self.last.get(kind, (0, ""))
                if count > mark:
                    return text
            return ""

    return ProjectLogger


def tensorrt_logger(trt):
    """The process's one logger (TensorRT expects a single logger per process)."""
    with _LOGGER_LOCK:
        if "logger" not in _LOGGER:
            _LOGGER["logger"] = _logger_class(trt)()
        return _LOGGER["logger"]


def tensorrt_said(trt, mark: int) -> str:
    """'; TensorRT said: ...' with what TensorRT logged since `mark` ('' if nothing)."""
    said = tensorrt_logger(trt).said_since(mark)
    return f"; TensorRT said: {said}" if said else ""


def _driver_hint(driver_version: str) -> str:
    """What to install, given the CUDA version the driver supports ("12.4"; "" if unknown)."""
    if driver_version and int(driver_version.split(".")[0]) < 13:
        return (f"this driver supports CUDA {driver_version}, which runs TensorRT's CUDA 12 builds: "
                'pip install "trufor-trt[trt-cu12]" (or a driver >= 580 for the CUDA 13 builds)')
    return (f"this driver supports CUDA {driver_version}; " if driver_version else "") + INSTALL_BY_DRIVER


def _created(what: str, factory, trt, driver_version: str):
    logger = tensorrt_logger(trt)
    mark = logger.mark()
    try:
        return factory(logger)
    except (TypeError, RuntimeError) as exc:  # pybind11's "factory function returned nullptr"
        raise EngineError(f"TensorRT {getattr(trt, '__version__', '?')} could not start CUDA for its {what} "
                          f"({one_line(exc)}{tensorrt_said(trt, mark)}): the TensorRT build needs a newer "
                          f"driver, or no GPU is usable; {_driver_hint(driver_version)}") from None


def start_runtime(trt, driver_version: str = ""):
    """A trt.Runtime; call with the CUDA context current. `driver_version`: the CUDA version the
    driver supports ("12.4"), named in the failure."""
    return _created("runtime", trt.Runtime, trt, driver_version)


def start_builder(trt, driver_version: str = ""):
    """A trt.Builder; call with the CUDA context current."""
    return _created("builder", trt.Builder, trt, driver_version)
