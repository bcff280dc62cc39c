"""The project's TensorRT and CUDA code against NVIDIA's real Python bindings of every supported
release (tests/real_bindings.py brings them; tests/binding_drive.py runs the project's code paths
in a child process and checks each call there).

For each TensorRT release: every call the build, the runner and the chain make is accepted by the
real classes (pybind11's own overload resolution), each with negative controls that the real
classes reject; every TensorRT attribute the modules name was met by the drive (the list comes
from the code); the factories' real failure and the failures TensorRT answers (None, False, -1,
ValueError, its log) become one-line reasons. For each cuda-bindings release: the cuda-python
layer's every call and its handle conversions. Then the commands (`doctor --json`, `analyze
--backend auto`) with the real modules on this machine, which has no driver.

pycuda is not among them: it only builds from source against a CUDA toolkit (tests/test_gpu.py
checks that layer on a GPU machine).
"""

import ast
import json
import re
from pathlib import Path

import pytest

from conftest import IMAGES_DIR, REPO
from real_bindings import CUDA_BINDINGS, TENSORRT, Bindings, real_bindings_factory

pytestmark = pytest.mark.real_bindings

DRIVE = Path(__file__).with_name("binding_drive.py")
NULLPTR = "pybind11::init(): factory function returned nullptr"
# The modules that call TensorRT, and the one that calls cuda-bindings.
TENSORRT_CODE = ["engine/tensorrt_start.py", "engine/tensorrt_shared.py", "engine/tensorrt_runner.py",
                 "engine/tensorrt_chain.py", "export/tensorrt_build.py"]
CUDA_PYTHON_CODE = ["engine/cuda_bindings.py"]
# Each TensorRT release is driven with a cuda-bindings of its CUDA major.
CUDA_OF = {"cu12-10.0.1": "12.8.0", "cu12-10.3.0": "12.9.10", "cu12-10.16.1.11": "12.9.10",
           "cu12-11.4.0.106": "12.9.10", "cu13-10.16.1.11": "13.5.0", "cu13-11.4.0.106": "13.5.0"}
# What a release lacks, which the code reaches only behind a version guard (getattr / hasattr):
# the names new in 10.1, and what the code uses where they are missing (10.0).
GUARDED = {"ICudaEngine.device_memory_size_v2": "device_memory_size",
           "IExecutionContext.set_device_memory": "device_memory"}
# Names the modules read that TensorRT's classes also have, read there on other objects.
NOT_TENSORRT = {"dtype": "numpy's (the buffers' element types); IHostMemory.dtype is never read",
                "update": "dicts' (the chain's buffer sizes)"}


@pytest.fixture(scope="session")
def real_bindings(tmp_path_factory):
    return real_bindings_factory(tmp_path_factory)


@pytest.fixture(scope="session")
def drives(real_bindings, tmp_path_factory) -> dict:
    """Every release's drive, run side by side: (kind, release) -> (its work folder, the
    finished process, its output)."""
    plans = {("tensorrt", release): Bindings(tensorrt=wheel, cuda=CUDA_BINDINGS[CUDA_OF[release]])
             for release, wheel in TENSORRT.items()}
    plans.update({("cuda", version): Bindings(cuda=wheel) for version, wheel in CUDA_BINDINGS.items()})
    started = {}
    for (kind, release), bindings in plans.items():
        work = tmp_path_factory.mktemp(f"{kind}-{release}")
        started[(kind, release)] = (work, real_bindings.start(bindings, [str(DRIVE), kind, str(work)]))
    return {key: (work, process, *process.communicate(timeout=300)) for key, (work, process) in started.items()}


def _report(drives: dict, kind: str, release: str) -> dict:
    work, process, stdout, stderr = drives[(kind, release)]
    assert process.returncode == 0, f"{kind} {release}: the drive failed:\n{stderr[-4000:]}"
    return {**json.loads((work / "report.json").read_text()), "stdout": stdout, "stderr": stderr}


@pytest.fixture(params=sorted(TENSORRT))
def tensorrt_drive(request, drives) -> dict:
    """The drive's report for one TensorRT release (with a cuda-bindings of its CUDA major)."""
    report = _report(drives, "tensorrt", request.param)
    report["label"] = f"TensorRT {report['version']} ({request.param}, cuda-bindings {report['cuda_bindings']})"
    return report


@pytest.fixture(params=sorted(CUDA_BINDINGS))
def cuda_drive(request, drives) -> dict:
    report = _report(drives, "cuda", request.param)
    report["label"] = f"cuda-bindings {report['version']}"
    return report


def _rejected(report: dict) -> dict:
    return {call: verdict for call, verdict in report["calls"].items() if verdict != "accepted"}


def _unchecked_controls(report: dict, strict: bool) -> dict:
    """Calls whose negative controls the real binding accepted. strict: an argument made wrong
    in any position (one argument too many may fit another overload: 10.16 added one to
    build_serialized_network); else: every control."""
    unchecked = {}
    for call, control in report["controls"].items():
        accepted = [entry for entry in control["accepted"] if not strict or entry != "too many"]
        if accepted and (strict or len(accepted) == control["checked"]):
            unchecked[call] = accepted
    return unchecked


def _assert_went_through(report: dict) -> None:
    """The project's code paths ran to their end, and the real bindings took every call."""
    failed = {path: lines for path, lines in report["failures"].items() if lines}
    assert not failed, f"{report['label']}: the project's code failed on the real bindings: {failed}"
    assert not _rejected(report), f"{report['label']}: calls the real bindings reject: {_rejected(report)}"


def test_every_tensorrt_call_of_build_runner_and_chain_is_accepted_by_the_real_classes(tensorrt_drive):
    report, label = tensorrt_drive, tensorrt_drive["label"]
    _assert_went_through(report)
    # pybind11 rejects a wrong argument in any position: every control must be refused.
    assert not _unchecked_controls(report, strict=True), f"{label}: controls accepted: {report['controls']}"
    assert {"Builder.build_serialized_network", "IExecutionContext.execute_async_v3",
            "IExecutionContext.set_device_memory" if "IExecutionContext.set_device_memory" not in report["missing"]
            else "IExecutionContext.device_memory="} <= {call.split("(")[0] for call in report["calls"]}


def test_what_a_release_lacks_is_reached_only_behind_a_version_guard(tensorrt_drive):
    """The drive went through, so each lookup that failed was guarded; the test says which."""
    report = tensorrt_drive
    assert set(report["missing"]) <= set(GUARDED), f"{report['label']}: unguarded lookups {report['missing']}"
    expected = set(GUARDED) if report["version"].startswith("10.0.") else set()
    assert set(report["missing"]) == expected, f"{report['label']} lacks {report['missing']}"


def _attribute_names(paths: list) -> tuple:
    """(names read as attributes or through getattr / hasattr, names the code itself defines)."""
    read, defined = set(), set()
    for path in paths:
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                (defined if isinstance(node.ctx, ast.Store) else read).add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr") and isinstance(node.args[1], ast.Constant)):
                read.add(node.args[1].value)
    return read, defined


def test_every_tensorrt_attribute_the_modules_name_was_met_by_the_drive(tensorrt_drive):
    """Read from the modules' syntax trees: each name the code reads that is an attribute of a
    real TensorRT class the project's objects are of (and not a name of its own) was called or
    looked up on that class in the drive, so no call escapes the check above."""
    report = tensorrt_drive
    read, defined = _attribute_names(TENSORRT_CODE)
    tensorrt_names = {name for names in report["attributes"].values() for name in names}
    met = {found.group(1) for found in (re.match(r"\w+\.(\w+)", call) for call in report["calls"]) if found}
    met |= {name.split(".")[-1] for name in report["missing"]}
    fallbacks = {fallback for new, fallback in GUARDED.items() if new not in report["missing"]}
    unmet = (read - defined - set(NOT_TENSORRT) - fallbacks) & tensorrt_names - met
    assert not unmet, f"{report['label']}: TensorRT attributes in the code that the drive never reached: {unmet}"


def test_tensorrt_failures_are_one_line_reasons_with_what_tensorrt_said(tensorrt_drive):
    report, label = tensorrt_drive, tensorrt_drive["label"]
    reasons = report["reasons"]
    assert all("\n" not in reason for reason in reasons.values()), reasons
    for part in ("runtime", "builder"):  # the real factories, returning NULL
        said = report["start"][part]
        assert said.startswith(f"TensorRT {report['version']} could not start CUDA for its {part} "
                               f"(TypeError: {NULLPTR})"), said
        assert 'pip install "trufor-trt[trt-cu12]"' in said, said
    expected = {
        "parse": "TensorRT could not parse graph: Unsupported ONNX data type: UINT8 (2) (node Cast_7)",
        "parser factory": f"TensorRT could not create its ONNX parser (TypeError: {NULLPTR})",
        "profile shapes": "TensorRT refused the shapes of image (1, 3, 32, 32) .. (1, 3, 1536, 1536) (ValueError: min > opt)",
        "profile refused": "TensorRT refused the optimization profile",
        "no timing cache": "TensorRT could not create a timing cache",
        "unreadable timing cache": "ok; warning: the timing cache is unreadable or was made on another GPU",
        "foreign timing cache": "ok; warning: the timing cache is unreadable or was made on another GPU",
        "build": "TensorRT could not build an engine from graph; TensorRT said: Error Code 4: out of memory",
        "deserialize": "TensorRT could not load ",
        "context": "TensorRT could not create an execution context for fp32.engine: it needs 0.00 GiB",
        "room": "engine fp32.engine cannot run here now: it needs 0.04 GiB of device memory and 0.00 GiB are free",
        "profile mismatch": "engine fp32.engine: its profile ((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)) is not the one",
        "address": "TensorRT refused the address of tensor ",
        "input shape": "TensorRT refused input shape (1, 3, 64, 96)",
        "enqueue": "TensorRT failed to enqueue the inference",
        "chain context": "TensorRT could not create an execution context for the chain's encoder engine",
        "chain address": "TensorRT refused the address of image in the chain's encoder engine",
    }
    wrong = {case: reasons.get(case) for case, start in expected.items() if not str(reasons.get(case)).startswith(start)}
    assert not wrong, f"{label}: {wrong}"
    assert reasons["deserialize"].endswith("; TensorRT said: Serialization assertion failed")
    assert reasons["context"].endswith("; TensorRT said: out of device memory")
    assert reasons["foreign timing cache"].count("warning") == 1


def test_tensorrt_log_lines_go_to_stderr_in_the_projects_format(tensorrt_drive):
    """The project's ILogger: TensorRT's errors on stderr, stdout untouched (`doctor --json`
    writes JSON there; TensorRT's own trt.Logger prints to stdout)."""
    assert tensorrt_drive["stdout"] == "", f"{tensorrt_drive['label']}: {tensorrt_drive['stdout'][:300]!r}"
    for said in ("Error Code 4: out of memory", "Serialization assertion failed", "out of device memory"):
        assert f"TensorRT error: {said}\n" in tensorrt_drive["stderr"]


def test_the_cuda_python_layer_and_its_handle_conversions_on_the_real_driver_module(cuda_drive):
    report, label = cuda_drive, cuda_drive["label"]
    _assert_went_through(report)
    # Cython converts some arguments only after it has loaded libcuda (12.8: cuDeviceGetAttribute's
    # attribute): each call must still have a control it rejects.
    assert not _unchecked_controls(report, strict=False), f"{label}: {report['controls']}"
    assert report["facts"]["addresses"] == ["int", "int"]  # a device pointer and a stream, as TensorRT takes them
    assert report["facts"]["failed allocation"] == "CUDA error 2: out of memory"
    assert report["facts"]["failed start"] == ("no usable CUDA driver or GPU (cuda-python): CUDA error 100: "
                                               "no CUDA-capable device is detected")
    read, _ = _attribute_names(CUDA_PYTHON_CODE)
    driver_functions = {name for name in read if re.fullmatch(r"cu[A-Z]\w+", name)}
    called = {call.split("(")[0].removeprefix("driver.") for call in report["calls"]}
    assert driver_functions <= called, f"{label}: driver functions the drive never called: {driver_functions - called}"
    assert driver_functions <= set(report["driver_names"])


NO_DRIVER_PROBE = """
from trufor_trt.engine.cuda_layer import cuda_layer
from trufor_trt.errors import EngineError
from cuda.bindings import driver
handles = [driver.CUdeviceptr(0x7f0000001000), driver.CUstream(0x5000), driver.CUevent(0x6000)]
from trufor_trt.engine.cuda_bindings import native_handle
print(int(handles[0]), native_handle(handles[1]), native_handle(handles[2]))
try:
    cuda_layer("cuda-python")
except EngineError as exc:
    print(exc)
"""


@pytest.mark.parametrize("version", sorted(CUDA_BINDINGS))
def test_without_a_driver_the_cuda_python_layer_says_so_in_one_line(real_bindings, version):
    result = real_bindings.run(Bindings(cuda=CUDA_BINDINGS[version]), ["-c", NO_DRIVER_PROBE], timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    conversions, reason = result.stdout.strip().splitlines()
    assert conversions == f"{0x7f0000001000} {0x5000} {0x6000}"
    assert reason.startswith("no NVIDIA GPU or driver found (cuda-python: "), reason


DOCTOR_RELEASES = ["cu13-11.4.0.106", "cu12-10.3.0"]


@pytest.mark.slow  # the commands: about 3 s each
@pytest.mark.parametrize("release", DOCTOR_RELEASES)
def test_doctor_json_with_real_tensorrt_and_cuda_bindings_and_no_driver(real_bindings, release):
    bindings = Bindings(tensorrt=TENSORRT[release], cuda=CUDA_BINDINGS["13.5.0"])
    result = real_bindings.run(bindings, ["-m", "trufor_trt", "doctor", "--json"], timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)  # nothing but JSON on stdout
    version = TENSORRT[release].version
    assert report["tensorrt"]["version"] == version and not report["tensorrt"]["can_build"]
    problem = report["backends"]["tensorrt"]["problem"]
    assert "\n" not in problem and "no NVIDIA GPU or driver found (cuda-python: " in problem, problem
    assert report["cuda"]["problem"] == report["tensorrt"]["problem"].removeprefix("no GPU to build on (")[:-1]
    text = real_bindings.run(bindings, ["-m", "trufor_trt", "doctor"], timeout=120)
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert f"TensorRT: {version}; can build here: no (no GPU to build on (no NVIDIA GPU or driver found" in text.stdout


@pytest.mark.slow
def test_analyze_auto_with_real_tensorrt_and_no_driver_runs_onnxruntime(real_bindings, model_seed0, tmp_path):
    bindings = Bindings(tensorrt=TENSORRT["cu13-11.4.0.106"], cuda=CUDA_BINDINGS["13.5.0"])
    out = tmp_path / "out"
    result = real_bindings.run(bindings, ["-m", "trufor_trt", "analyze", str(IMAGES_DIR / "tampered2.png"),
                                          "--model", str(model_seed0), "--out", str(out), "--no-png"], timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    notices = [line for line in result.stderr.splitlines() if "TensorRT not used" in line]
    assert len(notices) == 1 and "no NVIDIA GPU or driver found" in notices[0], result.stderr
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and record["backend"] == "onnxruntime"


@pytest.mark.slow
def test_build_with_real_tensorrt_and_no_driver_exits_2_with_one_line(real_bindings, model_seed0):
    bindings = Bindings(tensorrt=TENSORRT["cu12-10.3.0"], cuda=CUDA_BINDINGS["12.9.10"])
    result = real_bindings.run(bindings, ["-m", "trufor_trt", "build", "--fp32", "--model", str(model_seed0)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no NVIDIA GPU or driver found (cuda-python: " in errors[0], result.stderr
