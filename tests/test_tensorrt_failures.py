"""The ways TensorRT and CUDA fail on real machines that need a GPU to answer first, each a
one-line reason and never a traceback: a Runtime or Builder that TensorRT cannot create on the
GPU's driver (the nullptr factory of NVIDIA/TensorRT#2913), a pycuda driver error; and build's
validation bookkeeping.

TensorRT here is NVIDIA's real binding module over stub libraries (tests/real_bindings.py): its
factories fail for real. pycuda only builds from source against a CUDA toolkit, so it is a
stand-in written by this test that answers as a GPU with a CUDA 12.4 driver and cannot allocate:
it exercises this project's handling of pycuda's errors and nothing else (tests/test_gpu.py
checks the real pycuda on a GPU). Every TensorRT and cuda-python call shape, and the failures
TensorRT answers, are tests/test_real_bindings.py's.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from trufor_trt.engine.cuda import Gpu

from conftest import IMAGES_DIR
from real_bindings import TENSORRT, Bindings, real_bindings_factory

NULLPTR = "pybind11::init(): factory function returned nullptr"
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
REAL_TENSORRT = Bindings(tensorrt=TENSORRT["cu12-10.3.0"])


@pytest.fixture(scope="module")
def failing_site(tmp_path_factory):
    """A folder whose pycuda answers as a GPU but cannot allocate."""
    if importlib.util.find_spec("pycuda"):
        pytest.skip("a real pycuda is installed here")
    site = tmp_path_factory.mktemp("failing-site")
    (site / "pycuda").mkdir()
    (site / "pycuda" / "__init__.py").write_text("")
    (site / "pycuda" / "_driver.py").write_text(FAKE_PYCUDA_ERRORS)
    (site / "pycuda" / "driver.py").write_text(FAKE_PYCUDA_DRIVER)
    return site


@pytest.fixture(scope="module")
def real_tensorrt(tmp_path_factory):
    return real_bindings_factory(tmp_path_factory)


def _run(args: list, site, real_tensorrt=None, timeout=300) -> subprocess.CompletedProcess:
    """The command with the pycuda stand-in (and, where given, the real TensorRT) importable."""
    if real_tensorrt is not None:
        return real_tensorrt.run(REAL_TENSORRT, args, timeout=timeout, extra_paths=[site])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=timeout)


def test_doctor_creates_a_runtime_and_a_builder_and_says_why_neither_starts(failing_site, real_tensorrt):
    result = _run(["-m", "trufor_trt", "doctor", "--json"], failing_site, real_tensorrt)
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


def test_build_whose_builder_cannot_start_exits_2_with_one_line(failing_site, real_tensorrt, model_seed0):
    result = _run(["-m", "trufor_trt", "build", "--fp32", "--model", str(model_seed0)], failing_site, real_tensorrt)
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
        failing_site, real_tensorrt, model_seed0, tmp_path):
    model = shutil.copytree(model_seed0, tmp_path / "model", copy_function=os.link)
    _stand_in_engine(model, "fp32")
    out = tmp_path / "out"
    result = _run(["-m", "trufor_trt", "analyze", str(IMAGES_DIR / "tampered2.png"), "--model", str(model),
                   "--out", str(out), "--no-png"], failing_site, real_tensorrt)
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
