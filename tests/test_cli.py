"""`trufor-trt analyze` end to end: a batch with a bad file, resumability, output layout."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from trufor_trt.batch.inputs import expand_inputs
from trufor_trt.batch.provenance import PROVENANCE_KEY
from trufor_trt.cli import app
from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input

from conftest import IMAGES_DIR, TOLERANCE_FLOORS

pytestmark = pytest.mark.shared

COCO = IMAGES_DIR / "cocoglide_sample"


def _crop(source, height, width):
    with Image.open(source) as image:
        return np.array(image.convert("RGB"))[:height, :width]


@pytest.fixture
def image_folder(tmp_path):
    """Small real images of odd sizes, grey, RGBA, a nested folder, a space, one corrupt file."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    sources = sorted(COCO.rglob("*.png"))
    Image.fromarray(_crop(sources[0], 45, 61)).save(folder / "odd size.png")
    Image.fromarray(_crop(sources[1], 64, 48)).convert("L").save(folder / "grey.png")
    Image.fromarray(_crop(sources[2], 40, 52)).convert("RGBA").save(folder / "nested" / "rgba.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    (folder / "readme.txt").write_text("not an image, not picked up from a folder\n")
    return folder


def _analyze(*args, backend="torch"):
    return CliRunner().invoke(app, ["analyze", *map(str, args), "--backend", backend])


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_batch_with_a_corrupt_file_finishes_the_others(tmp_path, image_folder, checkpoint_seed0):
    out = tmp_path / "out"
    result = _analyze(image_folder, "--out", out, "--checkpoint", checkpoint_seed0)
    assert result.exit_code == 1, result.output
    records = {record["input"]: record for record in _records(out)}
    assert len(records) == 4
    failed = records[str(image_folder / "corrupt.jpg")]
    assert failed["status"] == "error" and "corrupt JPEG" in failed["reason"]
    for name, shape in [("odd size.png", (45, 61)), ("grey.png", (64, 48)),
                        ("nested/rgba.png", (40, 52))]:
        record = records[str(image_folder / name)]
        assert record["status"] == "ok" and (record["height"], record["width"]) == shape
        assert set(record["times_ms"]) == {"decode", "preprocess", "inference", "postprocess",
                                           "write", "total"}
        saved = np.load(out / f"{name}.npz")
        assert sorted(saved.files) == ["conf", "imgsize", "map", "score", PROVENANCE_KEY]
        assert saved["map"].shape == shape and tuple(saved["imgsize"]) == shape
        assert 0.0 <= float(saved["score"]) <= 1.0 and record["score"] == float(saved["score"])
        for suffix in (".heatmap.png", ".conf.png", ".overlay.png"):
            assert cv2.imread(str(out / f"{name}{suffix}")).shape[:2] == shape
    assert not list(out.rglob("*.tmp")) and not (out / "corrupt.jpg.npz").exists()


def test_rerun_skips_done_images_and_overwrite_redoes_them(tmp_path, image_folder, checkpoint_seed0):
    out = tmp_path / "out"
    _analyze(image_folder / "grey.png", "--out", out, "--checkpoint", checkpoint_seed0, "--no-png")
    first = (out / "grey.png.npz").stat().st_mtime_ns
    assert _analyze(image_folder / "grey.png", "--out", out, "--checkpoint", checkpoint_seed0,
                    "--no-png").exit_code == 0
    assert _records(out)[-1]["status"] == "skipped"
    assert (out / "grey.png.npz").stat().st_mtime_ns == first
    assert _analyze(image_folder / "grey.png", "--out", out, "--checkpoint", checkpoint_seed0,
                    "--no-png", "--overwrite").exit_code == 0
    assert _records(out)[-1]["status"] == "ok"
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", ["grey.png", "nested/rgba.png", "odd size.png"])
def test_outputs_match_the_float64_reference(request, tmp_path, image_folder, checkpoint_seed0,
                                             reference_runner, name, backend):
    """Grey, RGBA and odd-sized inputs: the CLI's float32 outputs against the float64 network
    run on Pillow's decoding of the same file."""
    out = tmp_path / "out"
    source = (["--checkpoint", checkpoint_seed0] if backend == "torch"
              else ["--model", request.getfixturevalue("model_seed0")])
    assert _analyze(image_folder / name, "--out", out, *source, "--save-noiseprint", "--no-png",
                    backend=backend).exit_code == 0
    saved = np.load(out / f"{name.split('/')[-1]}.npz")
    rgb = np.array(Image.open(image_folder / name).convert("RGB"))
    reference = postprocess(reference_runner.infer(prepare_input(rgb, np.float64)),
                            reference_runner.detection_head)
    assert np.abs(saved["map"] - reference.localization_map).max() <= TOLERANCE_FLOORS["map"]
    assert np.abs(saved["conf"] - reference.confidence_map).max() <= TOLERANCE_FLOORS["conf"]
    assert abs(float(saved["score"]) - reference.score) <= TOLERANCE_FLOORS["score"]
    assert np.abs(saved["np++"] - reference.noiseprint).max() <= TOLERANCE_FLOORS["np++"]


def test_missing_named_file_is_a_failed_image_not_a_crash(tmp_path, image_folder, checkpoint_seed0):
    out = tmp_path / "out"
    result = _analyze(image_folder / "grey.png", tmp_path / "absent.png", "--out", out,
                      "--checkpoint", checkpoint_seed0, "--no-png")
    assert result.exit_code == 1
    assert [record["status"] for record in _records(out)] == ["ok", "error"]


def test_no_inputs_is_a_usage_error(tmp_path, checkpoint_seed0):
    result = _analyze(str(tmp_path / "*.png"), "--out", tmp_path / "out", "--checkpoint",
                      checkpoint_seed0)
    assert result.exit_code == 2 and "no input images" in result.output


def test_inputs_expand_folders_globs_and_files(image_folder):
    by_folder = [job.relative for job in expand_inputs([str(image_folder)])]
    assert by_folder == ["corrupt.jpg", "grey.png", "nested/rgba.png", "odd size.png"]
    by_glob = [job.relative for job in expand_inputs([str(image_folder / "**" / "*.png")])]
    assert by_glob == ["grey.png", "nested/rgba.png", "odd size.png"]
    twice = expand_inputs([str(image_folder / "grey.png"), str(image_folder)])
    assert [job.relative for job in twice] == ["grey.png", "corrupt.jpg", "nested/rgba.png",
                                               "odd size.png"]


@pytest.mark.parametrize("command", [["trufor-trt"], [sys.executable, "-m", "trufor_trt"]])
def test_entry_points_run(command):
    result = subprocess.run([*command, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("trufor-trt ")




@pytest.mark.slow
def test_torch_runners_on_two_threads_compute_what_each_computes_alone(checkpoint_seed0):
    """Two torch runners side by side (what `--backend torch --streams 2` runs), in different
    formulations: the official one (explicit attention scores, unfolded decoders) and the
    bounded one in row bands (a 1000 MiB budget bands 480x640). Each passes its formulation
    into the network as a value, so neither reaches the other's forward: byte for byte what
    each computes alone."""
    import torch

    from trufor_trt.engine.memory_budget import parse_memory
    from trufor_trt.engine.torch_runner import TorchRunner

    sources = [sorted(COCO.rglob("*.png"))[0], IMAGES_DIR / "pristine1.jpg"]
    prepared = [prepare_input(_crop(source, *size)) for source, size in zip(sources, [(256, 256), (480, 640)])]
    threads_before = torch.get_num_threads()
    runners = [TorchRunner(checkpoint_seed0, device="cpu", threads=1, official=True),
               TorchRunner(checkpoint_seed0, device="cpu", threads=1, max_memory_bytes=parse_memory("1000M"))]

    def run(k: int) -> list:
        """Runner k's raw outputs, as bytes, image after image (the two start on different sizes)."""
        outputs = [runners[k].infer(image) for image in (prepared if k else prepared[::-1])]
        return [b"".join(array.tobytes() for array in (raw.localization_logits, raw.confidence_logits,
                                                        raw.noiseprint)) for raw in outputs]

    try:
        for runner in runners:
            runner.load()
        alone = [run(0), run(1)]
        with ThreadPoolExecutor(2) as pool:
            side_by_side = list(pool.map(run, (0, 1)))
    finally:
        for runner in runners:
            runner.close()
        torch.set_num_threads(threads_before)  # PyTorch's thread count is the process's
    assert side_by_side == alone


def test_a_terminal_shows_each_images_score_above_the_progress_bar(tmp_path, model_seed0):
    """Issue 41: in a terminal `analyze` showed a progress bar and the summary, no score."""
    import os
    import re

    images = [IMAGES_DIR / "pristine1.jpg", IMAGES_DIR / "tampered2.png"]
    done = subprocess.run([sys.executable, "-m", "trufor_trt", "analyze", *map(str, images), "--no-png",
                           "--model", str(model_seed0), "--backend", "onnxruntime", "--out", str(tmp_path / "out")],
                          env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"},  # rich: a terminal
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stderr)
    for image in images:
        assert re.search(rf"{image.name}: score [01]\.\d{{4}}, ", shown), shown
