"""The host side at the speed of memory: the pictures' encoders, the pipeline's host workers
(the same bytes for any count, a bad image, a halt and a resume among them) and
`bench --host-only`. The network is replayed (benchmarks/host_only.ReplayRunner): these tests
are about everything around it. No assertion on times: those are the README's numbers."""

import io
import json
import shutil
import threading

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.inputs import expand_inputs
from trufor_trt.batch.pictures import JET_BGR, heatmap_png, overlay_png
from trufor_trt.batch.pipeline import analyze_batch
from trufor_trt.benchmarks.host_only import ReplayRunner
from trufor_trt.cli import app
from trufor_trt.engine.decode import decode_image
from trufor_trt.engine.postprocess import DetectionHead
from trufor_trt.engine.runner import RawOutputs

from conftest import require_shared


def _levels(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)


def test_heatmap_png_is_the_jet_colour_of_each_rounded_level():
    values = np.random.default_rng(3).random((37, 53)).astype(np.float32)
    values[0, :3] = [-0.2, 1.3, np.nan]
    data = heatmap_png(values)
    expected = cv2.applyColorMap(_levels(values), cv2.COLORMAP_JET)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), expected)
    from PIL import Image  # a second decoder: the palette PNG is standard, not only OpenCV's

    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[:, :, ::-1], expected)


def test_jet_palette_is_opencvs_colour_map():
    levels = np.arange(256, dtype=np.uint8)[None, :]
    np.testing.assert_array_equal(JET_BGR[levels], cv2.applyColorMap(levels, cv2.COLORMAP_JET))


def test_overlay_is_the_float64_blend_within_one_level():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (41, 29, 3), dtype=np.uint8)
    localization = rng.random((41, 29)).astype(np.float32)
    opacity = (0.6 * localization.astype(np.float64))[:, :, None]
    heat = cv2.applyColorMap(_levels(localization), cv2.COLORMAP_JET).astype(np.float64)
    expected = rgb[:, :, ::-1] * (1.0 - opacity) + heat * opacity
    ours = cv2.imdecode(np.frombuffer(overlay_png(rgb, localization), np.uint8), cv2.IMREAD_COLOR)
    assert np.max(np.abs(ours - expected)) <= 1.0


def _smooth_raw(height: int, width: int, seed: int) -> RawOutputs:
    """Raw outputs of the look of the network's: smooth logits on the 1/4 grid."""
    rng = np.random.default_rng(seed)
    grid = (max(1, height // 4), max(1, width // 4))

    def smooth(planes):
        return np.stack([cv2.GaussianBlur(plane, (0, 0), 3) * 8 for plane in planes]).astype(np.float32)
    return RawOutputs(smooth(rng.standard_normal((2, *grid))), smooth(rng.standard_normal((1, *grid))),
                      rng.standard_normal((height, width)).astype(np.float32))


@pytest.fixture(scope="module")
def replayed_folder(tmp_path_factory):
    """The 54 shared images and a broken one, with a replay runner holding outputs for each size."""
    from conftest import IMAGES_DIR

    require_shared()
    images = shutil.copytree(IMAGES_DIR, tmp_path_factory.mktemp("host") / "images")
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    sizes = {decode_image(job.path).shape[:2] for job in expand_inputs([str(images)])
             if job.path.name != "zz-broken.jpg"}
    rng = np.random.default_rng(5)
    head = DetectionHead(rng.standard_normal((128, 8)), rng.standard_normal(128) * 0.1,
                         rng.standard_normal((1, 128)) * 0.1, rng.standard_normal(1) * 0.1)
    stored = {size: _smooth_raw(*size, seed=index) for index, size in enumerate(sorted(sizes))}
    return images, stored, head


def _analyse(images, out, stored, head, workers: int, halt_after: int = 0):
    runner = ReplayRunner(stored, head, model_sha256="0" * 64)
    runner.load()
    halt, seen = threading.Event(), []

    def on_record(record) -> None:
        seen.append(record)
        if halt_after and len(seen) >= halt_after:
            halt.set()
    counts = analyze_batch(expand_inputs([str(images)]), [runner], AnalyzeOptions(out_dir=out),
                           on_record=on_record, halt=halt, workers=workers)
    return counts, seen


def _unit_bytes(out) -> dict:
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and not path.name.startswith("results") and not path.name.startswith("summary")}


def test_four_workers_write_the_bytes_one_worker_writes_through_a_halt_and_a_resume(tmp_path, replayed_folder):
    images, stored, head = replayed_folder
    one, four = tmp_path / "one", tmp_path / "four"
    counts, _ = _analyse(images, one, stored, head, workers=1)
    assert counts == {"ok": 54, "error": 1}

    stopped, _ = _analyse(images, four, stored, head, workers=4, halt_after=10)
    assert 10 <= sum(stopped.values()) < 55  # those in flight at the halt finished, the rest wait
    assert not list(four.rglob(".*.tmp"))
    resumed, _ = _analyse(images, four, stored, head, workers=4)
    assert resumed["skipped"] == stopped["ok"] and resumed["ok"] + stopped["ok"] == 54

    assert _unit_bytes(four) == _unit_bytes(one)
    lines = [json.loads(line) for line in (four / "results.jsonl").read_text().splitlines()]
    analysed = [line["input"] for line in lines if line["status"] == "ok"]
    assert len(analysed) == len(set(analysed)) == 54  # each image analysed once, over both runs


def test_a_size_without_stored_outputs_is_one_images_reason(tmp_path, replayed_folder):
    images, stored, head = replayed_folder
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "odd.png"), np.zeros((70, 90, 3), np.uint8))
    counts, seen = _analyse(folder, tmp_path / "out", stored, head, workers=2)
    assert counts == {"error": 1} and seen[0].reason == "no stored outputs for 70x90"


def test_bench_host_only_reports_every_size_png_setting_and_worker_count(tmp_path, checkpoint_seed0):
    from trufor_trt.engine.runner_spec import usable_cores

    if usable_cores() < 2:
        pytest.skip("--workers 2 needs two cores")
    report_path, markdown = tmp_path / "host.json", tmp_path / "README.md"
    markdown.write_text("before\n<!-- trufor-trt bench --host-only: begin -->\nold\n"
                        "<!-- trufor-trt bench --host-only: end -->\nafter\n")
    result = CliRunner().invoke(app, ["bench", "--host-only", "--checkpoint", str(checkpoint_seed0),
                                      "--sizes", "64x96", "--workers", "2", "--json", str(report_path),
                                      "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    runs = json.loads(report_path.read_text())["runs"]
    assert [(run["input"], run["pngs"], run["workers"]) for run in runs] == [
        ("64x96", False, 1), ("64x96", False, 2), ("64x96", True, 1), ("64x96", True, 2)]
    for run in runs:
        assert run["images"] == 20 * run["workers"] and run["cores"] == run["workers"]
        assert run["images_per_s"] > 0 and set(run["ms_per_megapixel"]) == {"decode", "preprocess",
                                                                            "postprocess", "write"}
        assert run["speedup_vs_one_worker"] == pytest.approx(
            run["images_per_s"] / next(other["images_per_s"] for other in runs
                                       if other["workers"] == 1 and other["pngs"] == run["pngs"]))
    text = markdown.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert text.count("| 64x96 |") == 4


def test_a_runner_that_breaks_stops_the_batch_and_what_it_inferred_is_written(tmp_path, replayed_folder):
    from trufor_trt.errors import RunnerFailure

    from conftest import BreaksAfter

    images, stored, head = replayed_folder
    replay = ReplayRunner(stored, head, model_sha256="0" * 64)
    runner = BreaksAfter(replay, images=5)
    runner.load()
    out = tmp_path / "out"
    with pytest.raises(RunnerFailure, match="fell off the bus"):
        analyze_batch(expand_inputs([str(images)]), [runner], AnalyzeOptions(out_dir=out), workers=4)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(line["status"] == "ok" for line in lines) == 5  # each inferred image, written and recorded
    assert not list(out.rglob(".*.tmp"))
