"""GPU packages that are installed but broken, as users meet them (a libnvinfer or libcuda that
fails to load raises OSError or ImportError at import), and `trufor-trt doctor` on this machine.

The broken packages are real packages on sys.path whose import raises, not stand-ins for
TensorRT or CUDA: nothing here computes as they would.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import IMAGES_DIR

BROKEN = {
    "tensorrt": 'raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")',
    "pycuda": 'raise ImportError("libcuda.so.1: cannot open shared object file")',
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A folder that shadows tensorrt and pycuda with packages whose import fails."""
    if any(importlib.util.find_spec(name) for name in BROKEN):
        pytest.skip("a real tensorrt or pycuda is installed here")
    site = tmp_path_factory.mktemp("broken-site")
    for name, body in BROKEN.items():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(body + "\n")
    return site


def _trufor(args: list, site=None, timeout=300) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    if site is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(site), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "trufor_trt", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout)


def test_analyze_auto_notices_the_broken_install_and_runs_onnxruntime(broken_site, model_seed0, tmp_path):
    image = IMAGES_DIR / "tampered2.png"
    result = _trufor(["analyze", str(image), "--model", str(model_seed0), "--out", str(tmp_path / "out"),
                      "--no-png"], broken_site)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    notice = [line for line in result.stderr.splitlines() if "TensorRT not used" in line]
    assert len(notice) == 1 and "running ONNX Runtime" in notice[0]
    assert "libnvinfer.so.10" in notice[0] and "pycuda is installed but does not load" in notice[0]
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and record["backend"] == "onnxruntime"


def test_build_with_a_broken_tensorrt_says_so_in_one_line(broken_site, model_seed0):
    result = _trufor(["build", "--fp32", "--model", str(model_seed0)], broken_site)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "TensorRT is installed but does not load (OSError: libnvinfer.so.10" in lines[0]


def test_the_cuda_layer_reports_a_broken_pycuda_in_one_line(broken_site):
    probe = ("from trufor_trt.engine.cuda_layer import cuda_layer\n"
             "from trufor_trt.errors import EngineError\n"
             "try:\n    cuda_layer()\nexcept EngineError as exc:\n    print(exc)\n")
    environment = {**os.environ, "PYTHONPATH": str(broken_site)}
    printed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=environment, timeout=60).stdout.strip().splitlines()
    assert len(printed) == 1
    assert printed[0].startswith("no CUDA layer: pycuda is installed but does not load (ImportError: libcuda.so.1")
    assert "cuda-python is not installed" in printed[0]


def test_doctor_with_broken_gpu_packages_names_each_reason(broken_site, model_seed0):
    result = _trufor(["doctor", "--model", str(model_seed0)], broken_site)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    text = result.stdout
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    # After "no NVIDIA GPU or driver found" where this machine has none (issue 41).
    assert lines["TensorRT"].startswith("TensorRT: none; can build here: no (")
    assert "TensorRT is installed but does not load (OSError" in lines["TensorRT"]
    assert lines["CUDA"].startswith("CUDA: none (")
    assert "no CUDA layer: pycuda is installed but does not load" in lines["CUDA"]
    assert f"model {model_seed0}: ok" in text


def test_doctor_here_no_gpu_onnxruntime_and_torch_usable_tensorrt_not():
    from trufor_trt.engine.cuda_layer import nvidia_driver_problem

    if importlib.util.find_spec("tensorrt") is not None or not nvidia_driver_problem():
        pytest.skip("TensorRT or an NVIDIA driver is installed here")
    result = _trufor(["doctor"])
    assert result.returncode == 0, result.stderr
    assert "backend onnxruntime: usable" in result.stdout and "backend torch: usable" in result.stdout
    # No driver here: said first, before the packages (issue 41), which are still named.
    assert "backend tensorrt: not usable: no NVIDIA GPU or driver found" in result.stdout
    assert "TensorRT: none; can build here: no (no NVIDIA GPU or driver found" in result.stdout
    assert 'pip install "trufor-trt[trt-cu13]"' in result.stdout and '"trufor-trt[trt-cu12]"' in result.stdout
    report = json.loads(_trufor(["doctor", "--json"]).stdout)
    assert report["cuda"]["gpus"] == [] and report["cuda"]["problem"].startswith("no NVIDIA GPU or driver found")
    assert "no CUDA layer" in report["cuda"]["problem"]
    backends = report["backends"]
    assert backends["onnxruntime"]["usable"] and backends["torch"]["usable"]
    assert not backends["tensorrt"]["usable"] and "not installed" in backends["tensorrt"]["problem"]
    assert "driver >= 580" in backends["tensorrt"]["install"]
    not_tried = {"ok": False, "problem": "not tried: no usable TensorRT and GPU"}
    assert report["tensorrt"] == {"version": None, "can_build": False, "problem": backends["tensorrt"]["problem"],
                                  "runtime": not_tried, "builder": not_tried}
    assert report["packages"]["numpy"] and report["packages"]["tensorrt"] is None
    assert report["cpu_memory"]["physical_gib"] > 0
    height, width = map(int, report["cpu_memory"]["onnxruntime_largest_square_image"].split("x"))
    assert height == width and height >= 1024
