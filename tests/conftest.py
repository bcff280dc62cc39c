"""Shared fixtures: the project's reference data in ../shared and a seeded official-format checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trufor_trt.engine.runner import Runner
from trufor_trt.errors import RunnerFailure

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRUFOR_SHARED", REPO.parent / "shared"))
GOLDEN_DIR = SHARED / "reference" / "golden"
IMAGES_DIR = SHARED / "data" / "images"
MAKE_CHECKPOINT = SHARED / "reference" / "make_checkpoint.py"

# Faithfulness: max abs error <= max(3 x the official float32 error, floor).
TOLERANCE_FLOORS = {"map": 1e-3, "conf": 5e-4, "score": 3e-4, "np++": 4e-3}
GOLDEN_ERROR_KEYS = {"map": "err_localization_map", "conf": "err_confidence_map",
                     "score": "err_score", "np++": "err_noiseprint"}
GOLDEN_VALUE_KEYS = {"map": "localization_map", "conf": "confidence_map",
                     "score": "score", "np++": "noiseprint"}


# Debian's Chromium, headless, for the report's browser tests (skipped where it is not installed).
CHROMIUM = shutil.which("chromium")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def rendered_dom(page: Path, profile: Path) -> str:
    """The page's DOM after Chromium ran its script."""
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120).stdout


# Fixtures that take minutes: every test using one is `slow` (pytest -m "not slow" skips them).
SLOW_FIXTURES = {"reduced_model", "bench_report"}


def pytest_collection_modifyitems(items):
    missing_shared = pytest.mark.skip(reason=f"reference data not found at {SHARED} (set TRUFOR_SHARED)")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("shared") and not MAKE_CHECKPOINT.is_file():
            item.add_marker(missing_shared)
    # The background plan (reduced_model_started) has the most idle CPU to use when the tests
    # that wait for it come last: those that need its model, then the camera-sized ones.
    items.sort(key=_waits_for_the_background_plan)


def _waits_for_the_background_plan(item) -> int:
    names = set(getattr(item, "fixturenames", ()))
    return 2 if "no_background_plan" in names else 1 if "reduced_model" in names else 0


def small_onnx_model(nodes, inputs, outputs, initializers):
    """A float32 ONNX model of a few nodes (opset 18, IR 10: what ONNX Runtime 1.31 reads)."""
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "small", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def run_onnx(model, **feeds):
    """The first output of `model` on `feeds`, in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def require_shared() -> None:
    if not MAKE_CHECKPOINT.is_file():
        pytest.skip(f"reference data not found at {SHARED} (set TRUFOR_SHARED)")


def shared_crop(path: Path, index: int, size=(48, 64)) -> Path:
    """A small PNG at `path`: the top-left corner of the index-th CocoGlide image (real ones, then fake)."""
    from PIL import Image

    source = sorted((IMAGES_DIR / "cocoglide_sample").rglob("*.png"))[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        Image.fromarray(np.array(image.convert("RGB"))[:size[0], :size[1]]).save(path)
    return path


def golden_files() -> list:
    return sorted(GOLDEN_DIR.glob("*.npz"))


def tolerance(golden, key: str) -> float:
    return max(3.0 * float(golden[GOLDEN_ERROR_KEYS[key]]), TOLERANCE_FLOORS[key])


def max_abs_error(ours, golden, key: str) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64)
                               - np.asarray(golden[GOLDEN_VALUE_KEYS[key]], np.float64))))


def make_checkpoint(out: Path, seed: int, *extra: str) -> Path:
    require_shared()
    pytest.importorskip("torch", reason="writing a checkpoint needs torch (the export extra)")
    subprocess.run([sys.executable, str(MAKE_CHECKPOINT), str(out), "--seed", str(seed), *extra],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def checkpoint_seed0(tmp_path_factory) -> Path:
    """The official-format checkpoint the golden outputs were computed from."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoints") / "seed0.pth.tar", 0)


@pytest.fixture(scope="session")
def torch_runner(checkpoint_seed0):
    from trufor_trt.engine.torch_runner import TorchRunner

    with TorchRunner(checkpoint_seed0, device="cpu") as runner:
        yield runner


@pytest.fixture(scope="session")
def reference_runner(checkpoint_seed0):
    """The same network in float64: the stand-in for exact arithmetic."""
    from trufor_trt.engine.torch_runner import TorchRunner

    with TorchRunner(checkpoint_seed0, device="cpu", precision="fp64") as runner:
        yield runner


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Exports the tests trigger go to a throwaway cache, never the user's; weights to a
    throwaway data folder (where none are stored)."""
    previous = {name: os.environ.get(name) for name in ("TRUFOR_TRT_CACHE", "TRUFOR_TRT_DATA")}
    os.environ["TRUFOR_TRT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["TRUFOR_TRT_DATA"] = str(tmp_path_factory.mktemp("data"))
    yield Path(os.environ["TRUFOR_TRT_CACHE"])
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def model_seed0(tmp_path_factory, checkpoint_seed0) -> Path:
    """`trufor-trt export` of the seed-0 checkpoint (verified at export)."""
    from trufor_trt.export.bundle import export_model_dir

    folder = tmp_path_factory.mktemp("models") / "seed0"
    export_model_dir(checkpoint_seed0, folder, on_step=lambda message: None)
    return folder


# Processes the `watch` and `serve` tests start: the real command line, each stopped by the test.
COCO = IMAGES_DIR / "cocoglide_sample"
LARGE_IMAGES = (IMAGES_DIR / "tampered1.png", IMAGES_DIR / "pristine2.jpg")  # 1536x2048, 1773x2048
# The suite's FP16 plan: 2 CocoGlide crops and the official 2048x1536 image, checked whole up to
# 1536x2048 under both kernel models; INT8 on top of it for 256 px engines.
FP16_MAX_SHAPE, INT8_MAX_SHAPE = "1536x2048", "256x256"


@pytest.fixture(scope="session")
def calibration_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for source in sorted((COCO / "fake").glob("*.png"))[:2] + [LARGE_IMAGES[0]]:
        shutil.copy(source, folder)
    return folder


def _reduced_model_exports(folder: Path, checkpoint: Path, calibration: Path) -> str:
    """A Python program that adds the FP16 then the INT8 variant to `folder` through the CLI."""
    commands = [["export", "--checkpoint", str(checkpoint), "--out", str(folder), "--precision", precision,
                 "--max-shape", max_shape, "--calib-images", str(calibration)]
                for precision, max_shape in (("fp16", FP16_MAX_SHAPE), ("int8", INT8_MAX_SHAPE))]
    return ("import subprocess, sys\n"
            f"for command in {commands!r}:\n"
            "    subprocess.run([sys.executable, '-m', 'trufor_trt', *command], check=True)\n")


@pytest.fixture(autouse=True, scope="session")
def reduced_model_started(request, tmp_path_factory, isolated_cache):
    """The suite's most expensive fixture (the FP16 and INT8 plans, about 10 minutes on 2 cores)
    starts with the session, in a background process at the lowest CPU priority, when a selected
    test needs it: it then takes only the CPU the other tests leave idle (a third of it, measured),
    and `reduced_model` waits for it. (None where no selected test needs it: the fast lane.)"""
    if not any("reduced_model" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    checkpoint = request.getfixturevalue("checkpoint_seed0")
    folder = shutil.copytree(request.getfixturevalue("model_seed0"), tmp_path_factory.mktemp("reduced") / "model")
    log = folder.parent / "export.log"
    program = _reduced_model_exports(folder, checkpoint, request.getfixturevalue("calibration_folder"))
    with open(log, "wb") as output:
        process = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", program], stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        yield folder, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def no_background_plan(reduced_model_started, request) -> None:
    """For tests that take GBs of memory (camera-sized images): the background plan (up to
    about 9 GB) is finished first, so that both never hold memory together on a 24 GB machine."""
    if reduced_model_started is not None:
        request.getfixturevalue("reduced_model")


@pytest.fixture(scope="session")
def reduced_model(reduced_model_started) -> Path:
    """The seed-0 model folder with FP16 and INT8 variants added through the CLI, each checked
    at full size up to its max shape (made once, in the background: reduced_model_started)."""
    folder, process, log = reduced_model_started
    assert process.wait(timeout=3600) == 0, log.read_text()[-4000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    for precision in ("fp16", "int8"):
        assert "warning" not in manifest["variants"][precision]["size_coverage"]  # the max shape is covered
    return folder


def cli_process(log: Path, *args: str) -> subprocess.Popen:
    """`trufor-trt ARGS` in a process of its own, its output in `log`."""
    with open(log, "ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "trufor_trt", *args], stdout=sink,
                                stderr=subprocess.STDOUT, cwd=REPO)


def stop_process(process: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL if it has not stopped within `timeout`; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def service_images(tmp_path_factory) -> Path:
    """Eight shared images of both kinds and three sizes, for `watch` and `serve` (the two large
    official images take a minute each on 2 cores: the batch tests cover them)."""
    require_shared()
    coco = IMAGES_DIR / "cocoglide_sample"
    sources = [IMAGES_DIR / "pristine1.jpg", IMAGES_DIR / "tampered2.png",
               *sorted((coco / "real").glob("*.png"))[:3], *sorted((coco / "fake").glob("*.png"))[:3]]
    folder = tmp_path_factory.mktemp("service-images")
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


@pytest.fixture(scope="session")
def analyzed_service_images(tmp_path_factory, model_seed0, service_images) -> Path:
    """What `analyze` writes for service_images (ONNX Runtime, FP32): the reference for both."""
    from typer.testing import CliRunner

    from trufor_trt.cli import app

    out = tmp_path_factory.mktemp("analyzed")
    result = CliRunner().invoke(app, ["analyze", str(service_images), "--out", str(out), "--model",
                                      str(model_seed0), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    return out


# The official full-size images in the batch set: their top-left corners, in their own format.
# Whole, each takes a minute through the real model on 2 cores and shows the batch nothing new
# (it batches by size, and these are the set's third and fourth sizes either way); whole, they go
# through the pipeline with the replay runner (test_host_side.py) and through the FP16 plan.
BATCH_CROPS = {"pristine2.jpg": (352, 480), "tampered1.png": (320, 416)}


@pytest.fixture(scope="session")
def shared_images(tmp_path_factory) -> Path:
    """The shared images as a batch (54: CocoGlide real and fake, the official four), the two
    full-size official ones cropped to BATCH_CROPS."""
    from PIL import Image

    require_shared()
    folder = shutil.copytree(IMAGES_DIR, tmp_path_factory.mktemp("shared") / "images")
    for name, (height, width) in BATCH_CROPS.items():
        with Image.open(IMAGES_DIR / name) as image:
            image.convert("RGB").crop((0, 0, width, height)).save(folder / name, quality=90)
    return folder


@pytest.fixture(scope="session")
def shared_images_analyzed(shared_images, model_seed0, tmp_path_factory) -> Path:
    """The output folder of the per-image job on every image of the batch set, one after the
    other in one thread, no pipeline, one ONNX Runtime session with its default threads (what
    `analyze` loads): the reference the batch ways in are held to, and the report's material."""
    from trufor_trt.batch.analyze import AnalyzeOptions, run_job
    from trufor_trt.batch.inputs import expand_inputs
    from trufor_trt.batch.results_log import ResultsLog
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner

    out = tmp_path_factory.mktemp("sequential")
    options = AnalyzeOptions(out_dir=out)
    with OnnxRuntimeRunner(model_seed0) as runner, ResultsLog(out) as log:
        for job in expand_inputs([str(shared_images)]):
            log.add(run_job(job, runner, options).record)
    assert log.summary == {"ok": 54}
    return out


def take_model_of(double: Runner, runner: Runner) -> None:
    """A test double around a real, loaded runner answers for its model: the detection head and
    what the outputs' provenance names."""
    double.detection_head, double.model_sha256 = runner.detection_head, runner.model_sha256
    double.model_files_sha256 = runner.model_files_sha256


class BreaksAfter(Runner):
    """A real runner that stops working after `images` images, as a GPU that falls off the bus:
    what `analyze`, `serve` and Ray do then is the subject, not how a device fails."""

    def __init__(self, runner: Runner, images: int):
        super().__init__()
        self.runner, self.left = runner, images
        self.backend, self.precision = runner.backend, runner.precision

    def load(self) -> None:
        self.runner.load()
        take_model_of(self, self.runner)

    def infer(self, prepared):
        if self.left == 0:
            raise RunnerFailure("GPU 0 fell off the bus")
        self.left -= 1
        return self.runner.infer(prepared)
