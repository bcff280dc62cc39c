"""The ways TensorRT and CUDA fail on real machines, each a one-line reason and never a traceback:
a Runtime or Builder that TensorRT cannot create (the nullptr factory of NVIDIA/TensorRT#2913),
a timing cache it cannot read, an execution context it cannot create, a pycuda driver error.

The `tensorrt` and `pycuda` packages here are stand-ins written by this test, failing exactly
those ways: they exercise this project's handling of the failures and nothing else. None of
this counts as TensorRT or CUDA coverage (tests/test_gpu.py is that, on a GPU).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from trufor_trt.engine.cuda import Gpu
from trufor_trt.errors import EngineError

from conftest import IMAGES_DIR

NULLPTR = "pybind11::init(): factory function returned nullptr"
FAKE_TENSORRT = f'''
__version__ = "10.3.0"


class Logger:
    WARNING = 2

    def __init__(self, severity):
        pass


class Runtime:
    def __init__(self, logger):
        raise TypeError("{NULLPTR}")


class Builder:
    def __init__(self, logger):
        raise TypeError("{NULLPTR}")
'''
FAKE_PYCUDA_ERRORS = '''
class Error(Exception):
    pass


class MemoryError(Error):
    pass
'''
FAKE_PYCUDA_DRIVER = '''
from pycuda._driver import Error, MemoryError


def init():
    pass


class device_attribute:
    INTEGRATED = "integrated"


class _Context:
    def push(self):
        pass


class Context:
    @staticmethod
    def pop():
        pass


class Device:
    @staticmethod
    def count():
        return 1

    def __init__(self, ordinal):
        pass

    def name(self):
        return "Stand-in GPU"

    def compute_capability(self):
        return (8, 9)

    def get_attribute(self, attribute):
        return 0

    def total_memory(self):
        return 8 << 30

    def retain_primary_context(self):
        return _Context()


def get_driver_version():
    return 12040


def mem_get_info():
    return (1 << 30, 8 << 30)


def mem_alloc(nbytes):
    raise MemoryError("cuMemAlloc failed: out of memory")
'''
STAND_IN_GPU = Gpu(name="Stand-in GPU", compute_capability=(8, 9), integrated=False)


@pytest.fixture(scope="module")
def failing_site(tmp_path_factory):
    """A folder whose `tensorrt` cannot start CUDA and whose pycuda answers but cannot allocate."""
    if any(importlib.util.find_spec(name) for name in ("tensorrt", "pycuda")):
        pytest.skip("a real tensorrt or pycuda is installed here")
    site = tmp_path_factory.mktemp("failing-site")
    (site / "tensorrt").mkdir()
    (site / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT)
    (site / "pycuda").mkdir()
    (site / "pycuda" / "__init__.py").write_text("")
    (site / "pycuda" / "_driver.py").write_text(FAKE_PYCUDA_ERRORS)
    (site / "pycuda" / "driver.py").write_text(FAKE_PYCUDA_DRIVER)
    return site


def _run(args: list, site, timeout=300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=timeout)


def test_doctor_creates_a_runtime_and_a_builder_and_says_why_neither_starts(failing_site):
    result = _run(["-m", "trufor_trt", "doctor", "--json"], failing_site)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    tensorrt = report["tensorrt"]
    assert tensorrt["version"] == "10.3.0" and not tensorrt["can_build"]
    for part in ("runtime", "builder"):
        assert not tensorrt[part]["ok"]
        problem = tensorrt[part]["problem"]
        assert f"could not start CUDA for its {part}" in problem and NULLPTR in problem
        assert "this driver supports CUDA 12.4, which runs TensorRT's CUDA 12 builds" in problem
        assert 'pip install "trufor-trt[trt-cu12]"' in problem
    assert not report["backends"]["tensorrt"]["usable"]
    assert report["backends"]["tensorrt"]["problem"] == tensorrt["runtime"]["problem"]


def test_build_whose_builder_cannot_start_exits_2_with_one_line(failing_site, model_seed0):
    result = _run(["-m", "trufor_trt", "build", "--fp32", "--model", str(model_seed0)], failing_site)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not start CUDA for its builder" in errors[0], result.stderr
    assert errors[0] == result.stderr.strip().splitlines()[-1]  # the last line, whole


def _stand_in_engine(model_dir, precision: str) -> None:
    """An engine file and its sidecar for the stand-in GPU: bookkeeping only (the survey of
    engines finds it usable; nothing could run it)."""
    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.engine.tensorrt_plan import DEFAULT_PROFILES, Sidecar, engine_path, sidecar_path
    from trufor_trt.files import sha256_bytes

    model = ModelDir.open(model_dir)
    profile = DEFAULT_PROFILES["datacenter"]
    path = engine_path(model.path, STAND_IN_GPU, "10.3.0", precision, profile)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in engine")
    Sidecar(precision=precision, profile=profile.as_dict(), tensorrt_version="10.3.0", device=STAND_IN_GPU.name,
            compute_capability=list(STAND_IN_GPU.compute_capability),
            onnx_file=model.variant_path(precision).name, onnx_sha256=model.variant_sha256(precision),
            strongly_typed=True, builder_flags=[], cleared_flags=["TF32"], tf32=False, workspace_gib=4.0,
            build_seconds=1.0, engine_sha256=sha256_bytes(b"stand-in engine")).write(sidecar_path(path))


def test_analyze_auto_with_an_engine_but_no_runtime_falls_back_to_onnxruntime_and_says_why(
        failing_site, model_seed0, tmp_path):
    model = shutil.copytree(model_seed0, tmp_path / "model", copy_function=os.link)
    _stand_in_engine(model, "fp32")
    out = tmp_path / "out"
    result = _run(["-m", "trufor_trt", "analyze", str(IMAGES_DIR / "tampered2.png"), "--model", str(model),
                   "--out", str(out), "--no-png"], failing_site)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    notice = [line for line in result.stderr.splitlines() if "TensorRT not used" in line]
    assert len(notice) == 1 and "could not start CUDA for its runtime" in notice[0]
    assert "running ONNX Runtime" in notice[0]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and record["backend"] == "onnxruntime"


PYCUDA_ALLOCATION = """
from trufor_trt.engine.cuda_layer import cuda_layer
from trufor_trt.errors import EngineError
layer = cuda_layer()
with layer.current():
    try:
        layer.device_buffer(1 << 40)
    except EngineError as exc:
        print(exc)
"""


def test_a_pycuda_driver_error_is_an_engine_error_in_one_line(failing_site):
    result = _run(["-c", PYCUDA_ALLOCATION], failing_site, timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip() == "CUDA device_buffer failed (pycuda): MemoryError: cuMemAlloc failed: out of memory"


class _Config:
    """A builder config whose timing caches are what the test says (TensorRT's own answers)."""

    def __init__(self, created: list, accepted: list):
        self.created, self.accepted, self.set = list(created), list(accepted), []

    def create_timing_cache(self, data: bytes):
        return self.created.pop(0)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.set.append(cache)
        return self.accepted.pop(0)


def test_an_unreadable_timing_cache_is_replaced_by_a_fresh_one():
    from trufor_trt.export.tensorrt_build import _timing_cache

    said = []
    config = _Config(created=[None, "fresh"], accepted=[True])  # None: TensorRT could not read it
    assert _timing_cache(config, b"truncated", said.append) == "fresh"
    assert config.set == ["fresh"] and "unreadable" in said[0]
    foreign = _Config(created=["foreign", "fresh"], accepted=[False, True])
    assert _timing_cache(foreign, b"other gpu", said.append) == "fresh"
    with pytest.raises(EngineError, match="could not create a timing cache"):
        _timing_cache(_Config(created=[None], accepted=[]), b"", said.append)


class _Engine:
    """A deserialized engine as TensorRT reports it, whose execution context cannot be made."""

    num_io_tensors = 4
    device_memory_size_v2 = 3 << 30
    names = ("image", "localization_logits", "confidence_logits", "noiseprint")

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str):
        return "INPUT" if name == "image" else "OUTPUT"

    def get_tensor_dtype(self, name: str):
        return type("DataType", (), {"name": "FLOAT"})()

    def get_tensor_profile_shape(self, name: str, profile: int):
        return [(1, 3, 32, 32), (1, 3, 1024, 1024), (1, 3, 2048, 2048)]

    def create_execution_context(self):
        return None


def _load_stand_in(tmp_path, free_bytes: int):
    """_LoadedEngine on the stand-in engine, the device having `free_bytes` free."""
    import numpy as np

    from trufor_trt.engine.tensorrt_plan import DEFAULT_PROFILES, Sidecar
    from trufor_trt.engine.tensorrt_runner import _LoadedEngine

    trt = type("tensorrt", (), {"nptype": staticmethod(lambda dtype: np.float32)})
    cuda = type("Cuda", (), {"free_memory": lambda self: free_bytes})()
    sidecar = Sidecar(precision="fp16", profile=DEFAULT_PROFILES["datacenter"].as_dict(), tensorrt_version="10.3.0",
                      device="Stand-in GPU", compute_capability=[8, 9], onnx_file="x.onnx", onnx_sha256="x",
                      strongly_typed=True, builder_flags=[], cleared_flags=["TF32"], tf32=False, workspace_gib=4.0,
                      build_seconds=1.0, engine_sha256="x")
    return _LoadedEngine(trt, cuda, _Engine(), tmp_path / "fp16.engine", sidecar, 0)


def test_a_runner_the_device_has_no_room_for_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(EngineError) as raised:
        _load_stand_in(tmp_path, free_bytes=1 << 30)
    message = str(raised.value)
    # 3 GiB of activations + the buffers for 2048 x 2048 (input 48 MiB, outputs 21 MiB)
    assert message.startswith("engine fp16.engine cannot run here now: it needs 3.07 GiB of device memory "
                              "and 1.00 GiB are free") and "--streams 1" in message


def test_an_execution_context_that_cannot_be_made_names_the_memory_it_needs(tmp_path):
    with pytest.raises(EngineError) as raised:
        _load_stand_in(tmp_path, free_bytes=64 << 30)
    message = str(raised.value)
    assert "could not create an execution context for fp16.engine" in message
    assert "it needs 3.00 GiB of device memory and 64.00 GiB are free" in message


def test_an_engine_whose_profile_is_not_its_sidecars_is_refused(tmp_path):
    from trufor_trt.engine.tensorrt_plan import DEFAULT_PROFILES
    from trufor_trt.engine.tensorrt_runner import _check_profile

    _check_profile(_Engine(), DEFAULT_PROFILES["datacenter"], tmp_path / "a.engine")  # the same: passes
    with pytest.raises(EngineError, match="is not the one its sidecar names"):
        _check_profile(_Engine(), DEFAULT_PROFILES["jetson"], tmp_path / "a.engine")


def test_builds_validation_is_recorded_in_the_sidecar_and_decides_whether_the_engine_runs(model_seed0, tmp_path):
    """The bookkeeping of build's validation, on a stand-in engine file: a real validation report
    (ONNX Runtime's FP32 graph against itself, on the synthetic images: no deviation) is
    written into the sidecar, which then lets the engine run; an over-budget one keeps it out.
    What TensorRT's kernels deviate is measured only on a GPU (tests/test_gpu.py)."""
    from dataclasses import replace

    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.engine.tensorrt_plan import Sidecar, sidecar_path, survey_engines
    from trufor_trt.validate import record_validation, validate

    model = ModelDir.open(shutil.copytree(model_seed0, tmp_path / "model", copy_function=os.link))
    _stand_in_engine(model.path, "fp32")
    [engine] = (model.path / "engines").rglob("*.engine")
    # The same bookkeeping as an FP16 engine's: the stand-in is relabelled, its graph hash kept.
    sidecar = replace(Sidecar.read(sidecar_path(engine)), precision="fp16")
    fp16_engine = engine.with_name(engine.name.replace("fp32-", "fp16-"))
    engine.rename(fp16_engine)
    sidecar.write(sidecar_path(fp16_engine))
    sidecar_path(engine).unlink()

    def usable() -> list:
        return survey_engines(model.path, STAND_IN_GPU, "10.3.0", "fp16", sidecar.onnx_sha256).usable

    assert usable() == []  # never validated
    [report] = validate(model, [("onnxruntime", "fp32")])
    said = []
    recorded = record_validation(fp16_engine, sidecar, report, "synthetic", said.append)
    assert Sidecar.read(sidecar_path(fp16_engine)) == recorded
    assert recorded.validation["within_budget"] and recorded.validation["image_count"] == len(report.images) == 3
    assert said == ["validated on 3 images: within the fp16 budget"] and len(usable()) == 1
    report.images[0].map_max = 0.5  # as an engine whose kernels moved the map
    over = record_validation(fp16_engine, sidecar, report, "synthetic", said.append)
    assert not over.validation["within_budget"] and "map 0.5 > 0.005" in said[-1] and usable() == []


FAKE_CUDA_DRIVER = '''
class CUresult(int):
    CUDA_SUCCESS = 0


CUresult.CUDA_SUCCESS = CUresult(0)


def cuInit(flags):
    return (CUresult(100),)


def cuGetErrorString(error):
    return (CUresult(0), b"no CUDA-capable device is detected")
'''
CUDA_PYTHON_PROBE = """
from trufor_trt.engine.cuda_layer import cuda_layer
from trufor_trt.errors import EngineError
try:
    cuda_layer("cuda-python")
except EngineError as exc:
    print(exc)
"""


def test_a_cuda_python_driver_error_is_one_line(tmp_path):
    """cuda-python's driver answering an error (here cuInit: no device) is a reason, not a traceback."""
    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("a real cuda-python is installed here")
    bindings = tmp_path / "site" / "cuda" / "bindings"
    bindings.mkdir(parents=True)
    for folder in (bindings.parent, bindings):
        (folder / "__init__.py").write_text("")
    (bindings / "driver.py").write_text(FAKE_CUDA_DRIVER)
    result = _run(["-c", CUDA_PYTHON_PROBE], tmp_path / "site", timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip() == ("no usable CUDA driver or GPU (cuda-python): CUDA error 100: "
                                     "no CUDA-capable device is detected")
