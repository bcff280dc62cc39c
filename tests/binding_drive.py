"""Run in a child process over the real TensorRT / cuda-bindings modules (tests/real_bindings.py):
the project's own TensorRT and CUDA code paths, every call they make checked against the real
bindings, and a JSON report in WORK_FOLDER/report.json.

How a call is checked: the real class's method (or constructor, property, driver function) is
called with the project's arguments in a forked child, so pybind11's (or Cython's) own argument
conversion and overload resolution decide. Objects that only TensorRT could make (a Builder, an
engine: every factory here returns NULL) are passed as uninitialized instances of their real
class, so a call that is accepted reaches C++ with a NULL object and dies there: accepted. A
call whose arguments fit no overload raises TypeError before that: rejected. Every accepted
call is checked again with one argument made wrong (or one too many), which must be rejected,
so the check itself can fail.

What the objects answer (an engine's tensors, a driver's pointers) is the scenario below,
given as the real value types (trt.Dims, trt.DataType, CUdeviceptr...) of the declared return
type; the stand-in objects are recorders that accept only what the real class declares.

Usage: python binding_drive.py tensorrt|cuda WORK_FOLDER
"""

import ctypes
import importlib
import inspect
import json
import os
import re
import resource
import sys
import traceback
from pathlib import Path

import numpy as np

NULLPTR = "factory function returned nullptr"


class Wrong:
    """An argument no real overload takes (the negative controls')."""


DECLARED = object()  # a scenario's answer that leaves it to the declared return type


class DriverError:
    """A scenario's answer: the driver function fails with this CUresult."""

    def __init__(self, code: int):
        self.code = code
STEPS = []  # what the project's build said along the way (its on_step)


def resolves(function, *args, **kwargs) -> str:
    """'accepted', or 'rejected: <why>': the real binding's verdict on these arguments, in a fork."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the call may dereference a NULL object: only this child dies of it
        os.close(read)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _plain_representations([*args, *kwargs.values()])
        verdict = "accepted"
        try:
            function(*args, **kwargs)
        except TypeError as exc:
            if NULLPTR not in str(exc):
                verdict = "rejected: " + str(exc).splitlines()[0]
        except BaseException:  # the call got through (a driver that is not there, a NULL object)
            pass
        os.write(write, verdict.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said or "accepted"  # killed inside C++: the arguments were taken


def _plain_representations(values) -> None:
    """object's repr and str for the classes of `values` (in the fork): pybind11 writes a
    rejection's message with repr() of every argument, and a class's own repr would read the
    NULL object (ParserError's does) and kill the child before it could say 'rejected'."""
    for value in values:
        kind = type(value)
        if kind.__module__.startswith("tensorrt"):
            kind.__repr__, kind.__str__ = object.__repr__, object.__str__


class Record:
    """Every call the project made and its verdict; the negative controls (per argument made
    wrong: the positions the binding still accepted); the lookups a release does not have."""

    def __init__(self):
        self.calls, self.missing, self.controls = {}, set(), {}

    def check(self, label: str, function, args: tuple, kwargs: dict) -> str:
        first = 0 if label.startswith("driver.") or label.endswith(".__init__") else 1  # args[0]: the object
        shown = [*map(_type_name, args[first:]), *(f"{key}={_type_name(value)}" for key, value in kwargs.items())]
        shape = f"{label}({', '.join(shown)})"
        if shape not in self.calls:
            self.calls[shape] = resolves(function, *args, **kwargs)
            if self.calls[shape] == "accepted":
                self.controls[shape] = _controls(function, args, kwargs, first)
        if self.calls[shape] != "accepted":
            raise TypeError(f"{shape}: {self.calls[shape]}")


def _controls(function, args: tuple, kwargs: dict, first: int) -> dict:
    """Each argument made wrong in turn, and one argument too many: those the binding still
    accepted (positions after the object, keyword names, 'too many')."""
    accepted = [index - first for index in range(first, len(args))
                if resolves(function, *args[:index], Wrong(), *args[index + 1:], **kwargs) == "accepted"]
    accepted += [key for key in kwargs if resolves(function, *args, **{**kwargs, key: Wrong()}) == "accepted"]
    if resolves(function, *args, Wrong(), **kwargs) == "accepted":
        accepted.append("too many")
    return {"checked": len(args) - first + len(kwargs) + 1, "accepted": accepted}


def _type_name(value) -> str:
    if isinstance(value, Recorder):
        return value._class.__name__
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[{', '.join(map(_type_name, value))}]"
    return type(value).__name__


def _return_type(doc: str, name: str) -> str:
    """The return annotation of the first signature in a pybind11 docstring."""
    for line in (doc or "").splitlines():
        found = re.match(rf"\s*(?:\d+\. )?{re.escape(name)}\(.*\) -> (.+)$", line)
        if found:
            return found.group(1).strip()
    return ""


class Recorder:
    """Stands for an object of a real TensorRT class that only TensorRT could make: its
    attributes must exist on that class and every call is checked against it (see `resolves`);
    what a call returns is the scenario's answer, else a Recorder of the declared class."""

    def __init__(self, real_class, drive):
        object.__setattr__(self, "_class", real_class)
        object.__setattr__(self, "_drive", drive)
        drive.reached.add(real_class)

    def _static(self, name: str):
        try:
            return inspect.getattr_static(self._class, name)
        except AttributeError:
            self._drive.record.missing.add(f"{self._class.__name__}.{name}")
            raise AttributeError(f"{self._class.__name__} has no attribute {name!r} "
                                 f"in TensorRT {self._drive.version}") from None

    def __getattr__(self, name: str):
        static = self._static(name)
        label = f"{self._class.__name__}.{name}"
        if isinstance(static, property):
            self._drive.record.check(label, static.fget, (self._drive.null(self._class),), {})
            return self._drive.answer(label, _return_type(static.fget.__doc__, ""), ())
        method = getattr(self._class, name)

        def call(*args, **kwargs):
            real_args = (self._drive.null(self._class), *map(self._drive.real, args))
            real_kwargs = {key: self._drive.real(value) for key, value in kwargs.items()}
            self._drive.record.check(label, method, real_args, real_kwargs)
            return self._drive.answer(label, _return_type(method.__doc__, name), args)
        return call

    def __setattr__(self, name: str, value) -> None:
        static = self._static(name)
        if not isinstance(static, property) or static.fset is None:
            raise AttributeError(f"{self._class.__name__}.{name} cannot be set")
        self._drive.record.check(f"{self._class.__name__}.{name}=", static.fset,
                                 (self._drive.null(self._class), self._drive.real(value)), {})

    def __bytes__(self) -> bytes:
        # Only classes that expose a buffer (IHostMemory) turn into bytes.
        self._drive.record.check(f"memoryview({self._class.__name__})", memoryview, (self._drive.null(self._class),), {})
        return b"serialized by the scenario"


class _RecordingModule:
    """A real module seen through the drive: lookups it lacks are recorded, and `_wrapped`
    decides what the project gets for each attribute."""

    prefix = ""

    def __init__(self, real, drive):
        self._real, self._drive = real, drive

    def __getattr__(self, name: str):
        if not hasattr(self._real, name):
            self._drive.record.missing.add(f"{self.prefix}.{name}")
        return self._wrapped(name, getattr(self._real, name))


class RecordingTensorRT(_RecordingModule):
    """The real tensorrt module, whose factories (Runtime, Builder, OnnxParser: NULL here) give
    Recorders once the real constructor has accepted the arguments."""

    prefix = "tensorrt"

    def _wrapped(self, name: str, value):
        if not (isinstance(value, type) and name in ("Runtime", "Builder", "OnnxParser")):
            return value

        def construct(*args):
            real_args = tuple(map(self._drive.real, args))
            self._drive.record.check(f"{name}.__init__", value, real_args, {})
            if name in self._drive.answers:  # the real factory, which returns NULL here
                return value(*real_args)
            return Recorder(value, self._drive)
        return construct


class RecordingDriver(_RecordingModule):
    """cuda-bindings' real driver module: each function is called for real (no driver: it is
    accepted when it fails for want of libcuda, rejected by TypeError) and answers (CUDA_SUCCESS,
    the values its docstring's Returns section declares, made of the real types)."""

    prefix = "driver"

    def _wrapped(self, name: str, value):
        if not (name.startswith("cu") and callable(value) and not isinstance(value, type)):
            return value

        def call(*args):
            self._drive.record.check(f"driver.{name}", value, args, {})
            failure = self._drive.answers.get(f"driver.{name}")
            if isinstance(failure, DriverError):
                return (self._real.CUresult(failure.code),)
            returned = [self._drive.driver_value(name, kind, index)
                        for index, kind in enumerate(_declared_returns(value.__doc__)[1:])]
            return (self._real.CUresult.CUDA_SUCCESS, *returned)
        return call


def _declared_returns(doc: str) -> list:
    """The types of a cuda-bindings function's Returns section: ['CUresult', 'CUdeviceptr', ...]."""
    lines = (doc or "").splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip() == "Returns") + 2
    indent = len(lines[start]) - len(lines[start].lstrip())
    kinds = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent or line.strip() in ("See Also", "Notes"):
            break
        if line.strip() and len(line) - len(line.lstrip()) == indent:
            kinds.append(re.sub(r".*[.~`: ]", "", line.strip().rstrip("`")) or line.strip())
    return kinds


class Drive:
    def __init__(self, version: str, answers: dict):
        self.version, self.answers, self.record = version, answers, Record()
        self.reached = set()  # the real classes the project's objects were of
        self.module = None  # the real tensorrt module
        self.addresses = 0x10000

    def null(self, real_class):
        """An instance of the real class that was never constructed (NULL inside)."""
        return real_class.__new__(real_class)

    def real(self, value):
        if isinstance(value, Recorder):
            return self.null(value._class)
        if isinstance(value, (tuple, list)):
            return type(value)(map(self.real, value))
        return value

    def answer(self, label: str, declared: str, args: tuple):
        value = self.answers.get(label, DECLARED)
        value = value(*args) if callable(value) and not isinstance(value, type) else value
        if isinstance(value, BaseException):
            raise value
        real_class = self._declared_class(declared)
        if value is not DECLARED:
            if not _fits(value, declared, real_class):
                raise TypeError(f"the scenario answers {value!r} for {label}, which returns {declared}")
            return value
        if declared in ("bool", "None"):
            return declared == "bool" or None
        if real_class is not None and _made_only_by_tensorrt(real_class):
            return Recorder(real_class, self)
        raise KeyError(f"the scenario has no answer for {label} (declared {declared})")

    def _declared_class(self, declared: str):
        """The real TensorRT class a return annotation names (C++ names drop their I), or None."""
        name = re.split(r"[.:]", declared)[-1]
        found = getattr(self.module, name, None) or getattr(self.module, name[1:], None)
        return found if isinstance(found, type) else None

    def driver_value(self, function: str, kind: str, index: int):
        key = f"driver.{function}"
        if key in self.answers:
            values = self.answers[key]
            values = values() if callable(values) else values
            return values[index] if isinstance(values, tuple) else values
        from cuda.bindings import driver

        self.addresses += 0x1000
        if kind == "CUdevice":
            return driver.CUdevice(0)
        return getattr(driver, kind)(self.addresses)  # CUdeviceptr, CUstream, CUevent, CUcontext


def _fits(value, declared: str, real_class) -> bool:
    """Whether a scenario's answer is of the type the real method declares (None stands for a
    failed factory; annotations other than a class or a plain type are not checked)."""
    plain = {"int": int, "bool": bool, "str": str, "float": float}
    if declared in plain:
        return isinstance(value, plain[declared])
    if real_class is not None:
        return value is None or isinstance(value, real_class)
    return True


def _made_only_by_tensorrt(real_class) -> bool:
    try:
        real_class()
    except TypeError:
        return True
    return False


# --- the scenario: an engine with the model's inputs and outputs, on one GPU -------------------

IMAGE_SHAPE = (1, 3, 64, 96)
IO = {"image": "INPUT", "localization_logits": "OUTPUT", "confidence_logits": "OUTPUT", "noiseprint": "OUTPUT"}


def _profile():
    from trufor_trt.engine.tensorrt_plan import DEFAULT_PROFILES

    return DEFAULT_PROFILES["jetson"]


def tensorrt_answers(trt) -> dict:
    """What the scenario's TensorRT objects answer, as the real value types they declare."""
    from trufor_trt.engine.tensorrt_runner import output_shape

    shapes = {}

    def tensor_shape(name):
        if name in shapes:
            return trt.Dims(shapes[name])
        batch, _, height, width = shapes.get("image", IMAGE_SHAPE)
        return trt.Dims((batch, *output_shape(name, height, width)[1:]))

    def set_input_shape(name, shape):
        shapes[name] = tuple(shape)
        return True
    return {
        "ICudaEngine.num_io_tensors": len(IO),
        "ICudaEngine.get_tensor_name": lambda index: list(IO)[index],
        "ICudaEngine.get_tensor_mode": lambda name: getattr(trt.TensorIOMode, IO[name]),
        "ICudaEngine.get_tensor_dtype": lambda name: trt.DataType.FLOAT,
        "ICudaEngine.get_tensor_profile_shape": lambda name, index: [trt.Dims(shape)
                                                                     for shape in _profile().input_shapes()],
        "ICudaEngine.device_memory_size_v2": 1 << 20,
        "ICudaEngine.device_memory_size": 1 << 20,
        "IExecutionContext.set_input_shape": set_input_shape,
        "IExecutionContext.get_tensor_shape": tensor_shape,
        "IBuilderConfig.add_optimization_profile": 0,
        "OnnxParser.num_errors": 0,
    }


def _host_memory(size: int, keep: list) -> int:
    buffer = ctypes.create_string_buffer(size)
    keep.append(buffer)
    return ctypes.addressof(buffer)


def driver_answers(keep: list) -> dict:
    """What the scenario's driver answers (the values its functions declare; real host memory
    where the project writes)."""
    return {
        "driver.cuDeviceGetCount": 1,
        "driver.cuDeviceGetName": b"Recorded GPU\0",
        "driver.cuDeviceGetAttribute": 8,
        "driver.cuDeviceTotalMem": 16 << 30,
        "driver.cuDriverGetVersion": 12040,
        "driver.cuMemGetInfo": (15 << 30, 16 << 30),
        "driver.cuMemHostAlloc": lambda: _host_memory(1 << 22, keep),
        "driver.cuEventElapsedTime": 0.5,
        "driver.cuGetErrorString": b"out of memory",
    }


def _logged(trt, severity: str, text: str):
    """An answer that first logs `text` to the project's logger through the real ILogger.log, as
    TensorRT does before it answers a failure with None."""
    def answer(*args):
        from trufor_trt.engine.tensorrt_start import tensorrt_logger

        tensorrt_logger(trt).log(getattr(trt.ILogger.Severity, severity), text)
        return None
    return answer


# --- the drives: the project's own code paths ------------------------------------------------

def install_recording_driver(drive: Drive) -> None:
    import cuda.bindings
    from cuda.bindings import driver

    recording = RecordingDriver(driver, drive)
    sys.modules["cuda.bindings.driver"] = recording
    cuda.bindings.driver = recording


def drive_cuda_layer(drive: Drive) -> dict:
    """The cuda-python layer's every method, as the runner and the chain use them, and a call
    that fails."""
    from trufor_trt.engine.cuda import DeviceSpan
    from trufor_trt.engine.cuda_bindings import CudaPythonLayer
    from trufor_trt.engine.cuda_layer import cuda_layer

    layer = cuda_layer("cuda-python")
    facts = {"count": layer.device_count(), "gpu": repr(layer.gpu(0)), "total": layer.total_memory(0),
             "driver": layer.driver_version()}
    with layer.current(0):
        stream, start, end = layer.stream(), layer.event(), layer.event()
        device, pinned = layer.device_buffer(4096), layer.pinned_buffer(4096)
        host = np.zeros(16, np.float32)
        start.record(stream)
        layer.copy_to_device(device, host, stream)
        layer.copy_on_device(device.at(64), device, 64, stream)
        layer.copy_on_device(DeviceSpan(device.address + 128), device.at(0), 64, stream)
        layer.copy_to_host(pinned.view(np.float32, 16), device, stream)
        end.record(stream)
        stream.synchronize()
        facts.update(free=layer.free_memory(), elapsed=end.milliseconds_since(start),
                     addresses=[type(value).__name__ for value in (device.address, stream.handle)])
        for handle in (device, pinned):
            handle.free()
        for handle in (stream, start, end):
            handle.close()
        drive.answers["driver.cuMemAlloc"] = DriverError(2)  # CUDA_ERROR_OUT_OF_MEMORY
        facts["failed allocation"] = _outcome(lambda: layer.device_buffer(1 << 40))
    drive.answers.update({"driver.cuInit": DriverError(100), "driver.cuGetErrorString": b"no CUDA-capable device is detected"})
    facts["failed start"] = _outcome(CudaPythonLayer)
    return facts


def drive_build(trt, work: Path) -> None:
    """serialize_engine on a graph file (a whole-image engine) and on bytes (a chain's part)."""
    from trufor_trt.engine.tensorrt_plan import build_settings
    from trufor_trt.export.tensorrt_build import serialize_engine

    graph = work / "graph.onnx"
    graph.write_bytes(b"an ONNX graph")
    cache = work / "timing.cache"  # the second build reads what the first wrote
    for source in (graph, graph.read_bytes()):
        serialize_engine(trt, build_settings(trt.__version__), source, "graph", {"image": _profile().input_shapes()},
                         1.0, cache, "12.4", STEPS.append)


def drive_runner(trt, work: Path) -> None:
    """A whole-image engine acquired (deserialized, checked), run on an image and closed."""
    from trufor_trt.engine.cuda_layer import cuda_layer
    from trufor_trt.engine.tensorrt_plan import Sidecar
    from trufor_trt.engine.tensorrt_runner import _LoadedEngine
    from trufor_trt.engine.tensorrt_shared import SHARED_ENGINES
    from trufor_trt.files import sha256_bytes

    engine_file = work / "fp32.engine"
    engine_file.write_bytes(b"an engine")
    sidecar = Sidecar(precision="fp32", profile=_profile().as_dict(), tensorrt_version=trt.__version__,
                      device="Recorded GPU", compute_capability=[8, 7], onnx_file="x.onnx", onnx_sha256="x",
                      strongly_typed=True, builder_flags=[], cleared_flags=["TF32"], tf32=False, workspace_gib=1.0,
                      build_seconds=1.0, engine_sha256=sha256_bytes(b"an engine"))
    with cuda_layer("cuda-python").current(0) as cuda:
        SHARED_ENGINES.runtime(trt, cuda, 0)
        loaded = _LoadedEngine.acquire(trt, cuda, engine_file, sidecar, 0)
        try:
            loaded.run(cuda, np.zeros(IMAGE_SHAPE, np.float32))
        finally:
            loaded.close()


def drive_chain_part(trt) -> None:
    """A chained part: its context on the chain's memory, its tensors placed, run."""
    from trufor_trt.engine.cuda import DeviceSpan
    from trufor_trt.engine.cuda_layer import cuda_layer
    from trufor_trt.engine.tensorrt_chain import _give_memory, _Part
    from trufor_trt.engine.tensorrt_shared import SHARED_ENGINES, deserialized

    with cuda_layer("cuda-python").current(0) as cuda:
        runtime = SHARED_ENGINES.runtime(trt, cuda, 0)
        part = _Part(trt, deserialized(trt, runtime, Path("encoder.engine"), b"a part"), "encoder")
        scratch, stream = cuda.device_buffer(1 << 20), cuda.stream()
        try:
            _give_memory(part.context, scratch, 1 << 20)
            part.run({"image": (DeviceSpan(scratch.address), IMAGE_SHAPE)},
                     {name: (DeviceSpan(scratch.address), 1 << 20) for name in list(IO)[1:]}, stream)
        finally:
            scratch.free()
            stream.close()


def drive_start(trt) -> dict:
    """Runtime and Builder started on the real module: the factories return NULL, as where
    TensorRT cannot start CUDA; what the project says of it."""
    from trufor_trt.engine.tensorrt_start import start_builder, start_runtime

    return {name: _outcome(lambda: start(trt, "12.4")) for name, start in
            (("runtime", start_runtime), ("builder", start_builder))}


def failure_cases(trt, work: Path) -> dict:
    """case -> (the answers that differ from the scenario's, the project's code that meets them)."""
    def build():
        drive_build(trt, work)

    def runner():
        drive_runner(trt, work)

    def chain_part():
        drive_chain_part(trt)
    sets = []
    return {
        "parse": ({"OnnxParser.parse_from_file": False, "OnnxParser.num_errors": 1,
                   "ParserError.desc": "Unsupported ONNX data type: UINT8 (2)", "ParserError.node_name": "Cast_7"},
                  build),
        "parser factory": ({"OnnxParser": "the real factory"}, build),
        "profile shapes": ({"IOptimizationProfile.set_shape": ValueError("min > opt")}, build),
        "profile refused": ({"IBuilderConfig.add_optimization_profile": -1}, build),
        "no timing cache": ({"IBuilderConfig.create_timing_cache": None}, build),
        "unreadable timing cache": ({"IBuilderConfig.create_timing_cache": lambda data: None if data else DECLARED},
                                    build),
        # the first build sets a fresh cache; the second refuses the one it wrote (another GPU's)
        "foreign timing cache": ({"IBuilderConfig.set_timing_cache": lambda *args: sets.append(args) or len(sets) != 2},
                                 build),
        "build": ({"Builder.build_serialized_network": _logged(trt, "ERROR", "Error Code 4: out of memory")}, build),
        "deserialize": ({"Runtime.deserialize_cuda_engine": _logged(trt, "ERROR", "Serialization assertion failed")},
                        runner),
        "context": ({"ICudaEngine.create_execution_context": _logged(trt, "ERROR", "out of device memory")}, runner),
        "room": ({"driver.cuMemGetInfo": (1 << 20, 16 << 30)}, runner),
        "profile mismatch": ({"ICudaEngine.get_tensor_profile_shape": lambda name, index: [trt.Dims((1, 3, 8, 8))] * 3},
                             runner),
        "address": ({"IExecutionContext.set_tensor_address": False}, runner),
        "input shape": ({"IExecutionContext.set_input_shape": False}, runner),
        "enqueue": ({"IExecutionContext.execute_async_v3": False}, runner),
        "chain context": ({"ICudaEngine.create_execution_context": None}, chain_part),
        "chain address": ({"IExecutionContext.set_tensor_address": False}, chain_part),
    }


def _outcome(run) -> str:
    """What the project said: its EngineError's text, or 'ok' and what the build said."""
    from trufor_trt.errors import EngineError

    STEPS.clear()
    try:
        run()
    except EngineError as exc:
        return str(exc)
    except Exception as exc:  # what the project let through: a traceback for its user
        return f"uncaught {_failures(lambda: _raise(exc))}"
    return "; ".join(["ok", *STEPS])


def _raise(exc: BaseException):
    raise exc


def _failures(run) -> list:
    """[] if `run` went through, else its exception and the last frames."""
    try:
        run()
    except BaseException as exc:
        return ["".join(traceback.format_exception_only(type(exc), exc)).strip(),
                *[line.strip() for line in traceback.format_tb(exc.__traceback__)[-3:]]]
    return []


def _run_tensorrt(work: Path, keep: list) -> tuple:
    real = importlib.import_module("tensorrt")
    drive = Drive(real.__version__, {})
    drive.module = real
    report = {"start": drive_start(real)}
    from cuda import bindings as cuda_bindings

    report["cuda_bindings"] = cuda_bindings.__version__
    sys.modules["tensorrt"] = trt = RecordingTensorRT(real, drive)
    install_recording_driver(drive)
    scenario = {**tensorrt_answers(real), **driver_answers(keep)}
    drive.answers = dict(scenario)
    report["failures"] = {"build": _failures(lambda: drive_build(trt, work)),
                          "runner": _failures(lambda: drive_runner(trt, work)),
                          "chain part": _failures(lambda: drive_chain_part(trt))}
    report["reasons"] = {}
    for case, (answers, run) in failure_cases(trt, work).items():
        drive.answers = {**tensorrt_answers(real), **driver_answers(keep), **answers}
        report["reasons"][case] = _outcome(run)
    return drive, report


def _run_cuda(keep: list) -> tuple:
    from cuda import bindings as cuda_bindings
    from cuda.bindings import driver

    drive = Drive(cuda_bindings.__version__, driver_answers(keep))
    report = {"driver_names": sorted(name for name in dir(driver) if not name.startswith("_"))}
    install_recording_driver(drive)
    facts = {}
    report["failures"] = {"cuda layer": _failures(lambda: facts.update(drive_cuda_layer(drive)))}
    report["facts"] = facts
    return drive, report


def main() -> None:
    which, work = sys.argv[1], Path(sys.argv[2])
    keep = []  # the scenario's host memory, alive to the end
    drive, report = _run_tensorrt(work, keep) if which == "tensorrt" else _run_cuda(keep)
    report.update(version=drive.version, calls=drive.record.calls, controls=drive.record.controls,
                  missing=sorted(drive.record.missing),
                  attributes={cls.__name__: sorted(name for name in dir(cls) if not name.startswith("_"))
                              for cls in drive.reached})
    (work / "report.json").write_text(json.dumps(report, indent=1))  # stdout is the project's to keep clean


if __name__ == "__main__":
    main()
