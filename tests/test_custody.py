"""Chain of custody: every row, picture and log line belongs to its own image and model.

Each test reproduces a way evidence could be mixed up or lost (two inputs under one output name,
two runs into one folder, an original replaced while it is analysed, an edited model folder,
outputs among the originals, messages swallowed with the codecs' noise, crashes where a line is
due, a crafted results.jsonl, a report that loses its pictures) and checks that it cannot happen.
"""

import csv
import html
import json
import os
import re
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.pictures import heatmap_bgr, thumbnail_bgr
from trufor_trt.batch.provenance import OFFICIAL_CHECKPOINT_SHA256, PROVENANCE_KEY
from trufor_trt.batch.report import build_report
from trufor_trt.cli import app
from trufor_trt.engine.model_dir import MANIFEST_FILE, files_sha256
from trufor_trt.engine.runner import Runner
from trufor_trt.files import sha256_bytes, sha256_file
from trufor_trt.service.watch import Watch, WatchOptions

from conftest import CHROMIUM, REPO, cli_process, rendered_dom, shared_crop, stop_process, take_model_of

pytestmark = pytest.mark.shared

TORCH = ("--backend", "torch")
DEADLINE = 120  # seconds a watch may take for two small images on 2 cores


def _analyze(*args, env=None):
    return CliRunner().invoke(app, ["analyze", *map(str, args)], env=env)


def _text(result) -> str:
    return " ".join(result.output.split())


def _records(out: Path) -> list:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _csv_rows(out: Path) -> dict:
    with open(out / "results.csv", newline="") as handle:
        return {row["input"]: row for row in csv.DictReader(handle)}


def _one_line_exit(result, code: int) -> str:
    """The single line a refused command printed (no traceback), checking its exit code."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("warning: checkpoint")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


class _Rows(HTMLParser):
    """A report page's rows: data-name -> {alt text of each picture: (thumbnail src, link)}."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._link = {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-name" in attrs:
            self._row = self.rows.setdefault(attrs["data-name"], {})
        elif tag == "a":
            self._link = attrs.get("href")
        elif tag == "img" and self._row is not None and attrs.get("loading") == "lazy":
            self._row[attrs["alt"]] = (attrs["src"], self._link)

    def handle_endtag(self, tag):
        if tag == "a":
            self._link = None


def _page_rows(text: str) -> dict:
    parser = _Rows()
    parser.feed(text)
    return parser.rows


def _difference(jpeg: Path, expected_bgr: np.ndarray) -> float:
    shown = cv2.imread(str(jpeg), cv2.IMREAD_COLOR).astype(np.float64)
    expected = thumbnail_bgr(expected_bgr).astype(np.float64)
    assert shown.shape == expected.shape, (jpeg, shown.shape, expected.shape)
    return float(np.mean(np.abs(shown - expected)))


def _own_pictures(out: Path, record: dict) -> dict:
    """What a record's thumbnails must show: its own image and its own maps (the .npz named after
    the input's path below its input folder, in3)."""
    with np.load(out / f"{Path(record['input']).relative_to('in3')}.npz") as saved:
        maps = {"localization map": heatmap_bgr(saved["map"]), "confidence map": heatmap_bgr(saved["conf"])}
    rgb = cv2.imread(record["input"], cv2.IMREAD_COLOR)
    return {"image": rgb, **maps}


def _check_each_row_shows_its_own(page_text: str, page_dir: Path, out: Path, records: list) -> None:
    rows = _page_rows(page_text)
    assert len(rows) == len(records)
    pictures = {record["input"]: _own_pictures(out, record) for record in records}
    for record in records:
        shown = rows[record["input"]]
        for kind, own in pictures[record["input"]].items():
            src, link = shown[kind]
            mine = _difference(page_dir / src, own)
            others = [_difference(page_dir / src, other[kind]) for name, other in pictures.items()
                      if name != record["input"]]
            assert mine < 8 and all(mine < other / 2 for other in others), (record["input"], kind, mine, others)
            assert (page_dir / link).resolve().is_file()
        assert (page_dir / shown["localization map"][1]).resolve() == \
            (out / f"{Path(record['input']).relative_to('in3')}.heatmap.png").resolve()


@pytest.fixture
def same_names(tmp_path, monkeypatch, checkpoint_seed0):
    """`analyze in3 --out R3 --report` from the folder above, in3 holding x.png and R3/x.png:
    an input subfolder named like the output folder. (out, its records)."""
    monkeypatch.chdir(tmp_path)
    shared_crop(tmp_path / "in3" / "x.png", 0, size=(64, 80))
    shared_crop(tmp_path / "in3" / "R3" / "x.png", 30, size=(64, 80))
    result = _analyze("in3", "--out", "R3", "--checkpoint", checkpoint_seed0, *TORCH, "--report")
    assert result.exit_code == 0, result.output
    return tmp_path / "R3", _records(tmp_path / "R3")


def test_the_report_shows_each_rows_own_pictures_when_an_input_folder_is_named_like_out(same_names):
    out, records = same_names
    _check_each_row_shows_its_own((out / "report.html").read_text(), out, out, records)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_shows_each_rows_own_pictures_when_two_inputs_share_a_name(same_names, tmp_path):
    out, records = same_names
    dom = rendered_dom(out / "report.html", tmp_path / "profile")
    assert "2 of 2 shown" in dom  # the page's own script ran
    _check_each_row_shows_its_own(dom, out, out, records)


def test_a_second_input_of_the_same_name_never_replaces_the_firsts_evidence(tmp_path, checkpoint_seed0):
    first = shared_crop(tmp_path / "A" / "IMG_0001.png", 0)
    second = shared_crop(tmp_path / "B" / "IMG_0001.png", 1)
    out = tmp_path / "R1"
    assert _analyze(first, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    evidence = (out / "IMG_0001.png.npz").read_bytes()

    refused = _analyze(second, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH)
    assert refused.exit_code == 1 and f"holds the evidence of {first}" in _text(refused)
    assert (out / "IMG_0001.png.npz").read_bytes() == evidence
    rows = _csv_rows(out)
    assert rows[str(first)]["status"] == "ok" and rows[str(second)]["status"] == "error"
    assert rows[str(first)]["npz_sha256"] == sha256_file(out / "IMG_0001.png.npz")

    replaced = _analyze(second, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert _records(out)[-1]["reason"] == f"redone: replaced the evidence of {first}"
    rows = _csv_rows(out)
    assert rows[str(second)]["status"] == "ok"
    assert rows[str(first)]["status"] == "superseded" and str(second) in rows[str(first)]["reason"]
    page = build_report(out).read_text()
    shown = _page_rows(page)
    assert shown[html.escape(str(first))] == {} and len(shown[html.escape(str(second))]) == 4

    shared_crop(second, 2)  # the same input, changed in place: redone, its one row replaced
    assert _analyze(second, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    assert _records(out)[-1]["reason"] == "redone: input changed" and len(_csv_rows(out)) == 2
    for record in _records(out):
        assert record["analysed_at"].endswith("Z") and time.strptime(record["analysed_at"][:19], "%Y-%m-%dT%H:%M:%S")


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_untouched(tmp_path, checkpoint_seed0):
    images = tmp_path / "images"
    for index in range(10):
        shared_crop(images / f"{index:02d}.png", index, size=(96, 96))
    out = tmp_path / "out"
    first = cli_process(tmp_path / "first.log", "analyze", str(images), "--out", str(out),
                        "--checkpoint", str(checkpoint_seed0), *TORCH)
    try:
        deadline = time.monotonic() + DEADLINE
        while not ((out / "results.jsonl").is_file() and (out / "results.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        second = _analyze(images, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH, "--overwrite")
        assert "another trufor-trt run is writing into this folder" in _one_line_exit(second, 2)
        assert first.wait(DEADLINE) == 0
    finally:
        stop_process(first)
    records = _records(out)
    assert len(records) == 10 and len(_csv_rows(out)) == 10
    for record in records:
        with np.load(out / record["outputs"]["npz"]["file"]) as saved:
            assert json.loads(str(saved[PROVENANCE_KEY])) == record["provenance"]
        assert all(sha256_file(out / entry["file"]) == entry["sha256"] for entry in record["outputs"].values())


class _ReplacesItsInput(Runner):
    """A real runner; while it infers its first image, a camera writes new bytes under that
    image's name (the subject is what watch files away, not how a camera works)."""

    def __init__(self, runner: Runner, path: Path, new_bytes: bytes):
        super().__init__()
        self.runner, self.path, self.new_bytes, self.calls = runner, path, new_bytes, 0
        self.backend, self.precision = runner.backend, runner.precision
        take_model_of(self, runner)

    def load(self) -> None:
        pass

    def infer(self, prepared):
        self.calls += 1
        if self.calls == 1:
            self.path.write_bytes(self.new_bytes)
        return self.runner.infer(prepared)


def _watch_until(runner: Runner, inbox: Path, out: Path, done: Path, finished) -> list:
    """Run a watch (settle 0) in a thread until finished() or DEADLINE; its notices."""
    notices, stop = [], threading.Event()
    options = WatchOptions(AnalyzeOptions(out_dir=out), done_dir=done, poll=0.1, settle=0.0)
    watch = Watch(inbox, runner, options, stop, on_record=lambda record: None, on_notice=notices.append)
    thread = threading.Thread(target=watch.run)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while not finished() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(DEADLINE)
    return notices


def test_watch_never_files_away_an_original_replaced_while_it_was_analysed(tmp_path, torch_runner):
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "done"
    original = shared_crop(inbox / "IMG_0001.png", 0)
    old_bytes, new_bytes = original.read_bytes(), shared_crop(tmp_path / "new.png", 1).read_bytes()
    runner = _ReplacesItsInput(torch_runner, original, new_bytes)
    notices = _watch_until(runner, inbox, out, done, lambda: (done / "IMG_0001.png").exists())
    records = _records(out)
    assert [record["provenance"]["input_sha256"] for record in records] == [sha256_bytes(old_bytes),
                                                                           sha256_bytes(new_bytes)]
    assert records[0]["filed_to"] is None and records[1]["filed_to"] == str(done / "IMG_0001.png")
    assert (done / "IMG_0001.png").read_bytes() == new_bytes
    assert any("changed after it was analysed" in notice for notice in notices), notices


def test_the_bytes_a_record_hashes_are_the_bytes_it_decoded_though_the_file_is_replaced_between(
        tmp_path, torch_runner):
    """The file is read once: replaced after the job opened (hashed), its evidence is still the
    first file's, under the first file's SHA-256."""
    from trufor_trt.batch.analyze import analyse_file, complete_job, open_job
    from trufor_trt.batch.inputs import ImageJob
    from trufor_trt.engine.timing import StageClock

    image = shared_crop(tmp_path / "in" / "a.png", 0)
    old_bytes = image.read_bytes()
    options = AnalyzeOptions(out_dir=tmp_path / "out", write_png=False)
    flight = open_job(ImageJob(image, "a.png"), torch_runner, options)
    os.replace(shared_crop(tmp_path / "other.png", 1), image)
    result = complete_job(flight, torch_runner, options)
    assert result.record.status == "ok" and result.record.provenance["input_sha256"] == sha256_bytes(old_bytes)
    _, expected = analyse_file(image, torch_runner, StageClock(), data=old_bytes)
    np.testing.assert_array_equal(result.analysis.localization_map, expected.localization_map)


@pytest.fixture
def edited_model(tmp_path, model_seed0) -> Path:
    """A copy of the seed-0 model folder (graphs linked, manifest and detection head copied)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for entry in model_seed0.iterdir():
        if entry.name in (MANIFEST_FILE, "detection_head.npz"):
            (folder / entry.name).write_bytes(entry.read_bytes())
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


def test_a_model_file_the_manifest_does_not_vouch_for_is_never_loaded(tmp_path, edited_model):
    image = shared_crop(tmp_path / "images" / "x.png", 0)
    manifest = json.loads((edited_model / MANIFEST_FILE).read_text())
    good = _analyze(image, "--out", tmp_path / "good", "--model", edited_model, "--backend", "onnxruntime")
    assert good.exit_code == 0, good.output
    made_by = _records(tmp_path / "good")[0]["provenance"]
    loaded = [variant["file"] for name, variant in manifest["variants"].items() if name.startswith("fp32-cpu")]
    assert made_by["model_files_sha256"] == files_sha256({name: manifest["files"][name]
                                                          for name in [*loaded, "detection_head.npz"]})
    assert made_by["official"] is False and made_by["model_sha256"] == manifest["checkpoint"]["sha256"]

    with np.load(edited_model / "detection_head.npz") as head:
        arrays = {name: head[name] for name in head.files}
    arrays["output_bias"] = arrays["output_bias"] + 5.0
    np.savez(edited_model / "detection_head.npz", **arrays)
    del manifest["files"]["detection_head.npz"]
    manifest["checkpoint"]["sha256"] = OFFICIAL_CHECKPOINT_SHA256
    (edited_model / MANIFEST_FILE).write_text(json.dumps(manifest))
    refused = _analyze(image, "--out", tmp_path / "edited", "--model", edited_model, "--backend", "onnxruntime")
    line = _one_line_exit(refused, 2)
    assert "detection_head.npz not listed with its hash" in line, line
    assert not (tmp_path / "edited" / "x.png.npz").exists()


def test_the_official_checkpoint_is_the_one_the_readme_names():
    assert f"SHA-256\n`{OFFICIAL_CHECKPOINT_SHA256}`" in (REPO / "README.md").read_text()


def test_results_of_another_checkpoint_say_so(tmp_path, checkpoint_seed0):
    image = shared_crop(tmp_path / "images" / "x.png", 0)
    result = _analyze(image, "--out", tmp_path / "out", "--checkpoint", checkpoint_seed0, *TORCH, "--report")
    assert result.exit_code == 0 and "is not the official trufor.pth.tar" in _text(result)
    assert _records(tmp_path / "out")[0]["provenance"]["official"] is False
    assert _csv_rows(tmp_path / "out")[str(image)]["official"] == "False"
    assert "Not the official TruFor checkpoint" in (tmp_path / "out" / "report.html").read_text()


def test_outputs_never_go_among_the_originals(tmp_path, monkeypatch, checkpoint_seed0):
    folder = tmp_path / "d"
    image = shared_crop(folder / "a.png", 0)
    named_like_an_output = shared_crop(folder / "a.png.overlay.png", 1)
    before = named_like_an_output.read_bytes()
    for inputs, out, why in (([folder], folder, "inside the input folder"),
                             ([folder], folder / "results", "inside the input folder"),
                             ([image], folder, "holds input images"),
                             ([f"{folder}/**/*.png"], folder / "results", "inside the input folder")):
        started = time.perf_counter()
        line = _one_line_exit(_analyze(*inputs, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH), 2)
        assert why in line and time.perf_counter() - started < 1.0, line
    assert named_like_an_output.read_bytes() == before
    assert sorted(path.name for path in folder.rglob("*")) == ["a.png", "a.png.overlay.png"]

    work = tmp_path / "work"
    (work / "d1").mkdir(parents=True)
    monkeypatch.chdir(work)
    climbing = shared_crop(tmp_path / "x.png", 2)
    result = _analyze("d*/../../x.png", "--out", "out", "--checkpoint", checkpoint_seed0, *TORCH, "--no-png")
    assert result.exit_code == 0, result.output
    assert (work / "out" / "x.png.npz").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["d", "work", "x.png"]) and climbing.is_file()


def _float_tiff(side: int = 4000) -> bytes:
    """A valid TIFF of three 32-bit float samples a pixel, which the decoder (Pillow, as the
    official code) refuses: it has no mode for them."""
    rows, columns = np.mgrid[0:side, 0:side].astype(np.float32) / side
    return cv2.imencode(".tif", np.stack([rows, columns, rows * columns], -1), [cv2.IMWRITE_TIFF_COMPRESSION, 8])[1].tobytes()


def test_no_line_of_ours_is_lost_while_the_codecs_are_silenced(tmp_path, checkpoint_seed0):
    images = tmp_path / "in"
    tiff = _float_tiff()
    for group in range(2):  # each group's two images are inferred while its TIFF is decoded
        for index in range(2):
            shared_crop(images / f"g{group}a{index}.png", 2 * group + index, size=(64, 64))
        (images / f"g{group}z.tif").write_bytes(tiff)
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        finished = subprocess.run([sys.executable, "-m", "trufor_trt", "analyze", str(images), "--out",
                                   str(tmp_path / "out"), "--checkpoint", str(checkpoint_seed0), *TORCH],
                                  stdout=subprocess.DEVNULL, stderr=stderr, timeout=300, cwd=REPO)
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    assert finished.returncode == 1, lines
    for image in sorted(images.iterdir()):
        mentions = [line for line in lines if str(image) in line]
        assert len(mentions) == 1, (image.name, lines)
    assert sum(line.startswith("failed ") and "unsupported TIFF" in line for line in lines) == 2


def test_validate_runs_the_torch_backend_from_the_checkpoint_it_is_given(tmp_path, model_seed0, checkpoint_seed0):
    images = tmp_path / "images"
    shared_crop(images / "x.png", 0, size=(64, 64))
    missing = _one_line_exit(CliRunner().invoke(app, ["validate", "--model", str(model_seed0), "--backend", "torch"]), 2)
    assert "--checkpoint" in missing
    result = CliRunner().invoke(app, ["validate", "--model", str(model_seed0), "--backend", "torch", "--checkpoint",
                                      str(checkpoint_seed0), "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert "torch fp32 vs fp32" in _text(result) and "overall" in result.output


def test_an_unwritable_cache_is_one_line(tmp_path, checkpoint_seed0):
    image = shared_crop(tmp_path / "images" / "x.png", 0)
    (tmp_path / "a-file").write_text("x")
    result = _analyze(image, "--out", tmp_path / "out", "--checkpoint", checkpoint_seed0, "--backend", "onnxruntime",
                      env={"TRUFOR_TRT_CACHE": str(tmp_path / "a-file" / "cache")})
    assert "export cache" in _one_line_exit(result, 2) and "TRUFOR_TRT_CACHE" in result.output


def test_a_full_disk_when_results_csv_is_rewritten_is_one_line(tmp_path, checkpoint_seed0):
    image = shared_crop(tmp_path / "images" / "x.png", 0)
    out = tmp_path / "out"
    out.mkdir()
    # The temporary name results.csv is written under in this process, led to a device that is
    # always full: the kernel's own ENOSPC, not a stand-in.
    (out / f".results.csv.{os.getpid()}.tmp").symlink_to("/dev/full")
    result = _analyze(image, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "results.csv not rewritten (No space left on device)" in _text(result), result.output
    assert "Traceback" not in result.output and _records(out)[0]["status"] == "ok"


def test_a_full_disk_stops_the_batch_at_the_first_unit_it_cannot_write(tmp_path, checkpoint_seed0):
    """The first image's heatmap is written to a device that is always full: the batch stops
    there (exit 3, one line), no later image is inferred only to fail in turn."""
    images = [shared_crop(tmp_path / "images" / f"{index}.png", index) for index in range(4)]
    out = tmp_path / "out"
    out.mkdir()
    (out / f".0.png.heatmap.png.{os.getpid()}.tmp").symlink_to("/dev/full")
    result = _analyze(*images, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH)
    assert result.exit_code == 3, result.output
    assert "stopped: the output folder takes no more files (No space left on device" in _text(result)
    assert "Traceback" not in result.output
    assert not [record for record in _records(out) if record["status"] == "error"], _records(out)
    assert not list(out.glob("0.png.*"))


def test_long_names_and_folders_named_like_the_batchs_files(tmp_path, checkpoint_seed0):
    """A 236-byte name is analysed (its temporary names are cut to fit); a name whose outputs
    could not be named gets its reason before inference; images in folders named results.csv or
    report.html are refused, and the batch's own files are written."""
    source = shared_crop(tmp_path / "source.png", 0).read_bytes()
    folder = tmp_path / "in"
    names = {"long": "l" * 232 + ".png", "too-long": "t" * 246 + ".png", "csv": "results.csv/a.png",
             "report": "Report.html/b.png"}
    for name in names.values():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(source)
    out = tmp_path / "out"
    result = _analyze(folder, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH, "--report")
    assert result.exit_code == 1, result.output
    records = {Path(record["input"]).relative_to(folder).as_posix(): record for record in _records(out)}
    assert records[names["long"]]["status"] == "ok"
    assert (out / (names["long"] + ".heatmap.png")).is_file()
    too_long = records[names["too-long"]]
    assert too_long["status"] == "error" and "gives a file name of 262 bytes, more than the 255" in too_long["reason"]
    assert "inference" not in (too_long.get("times_ms") or {})
    for key, batch_file in (("csv", "results.csv"), ("report", "Report.html")):
        assert records[names[key]]["status"] == "error"
        assert f"where the batch's {batch_file} is" in records[names[key]]["reason"]
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()
    assert len(_csv_rows(out)) == 4


def test_lines_of_results_jsonl_that_are_not_records_are_passed_over(tmp_path, checkpoint_seed0):
    image = shared_crop(tmp_path / "images" / "x.png", 0)
    out = tmp_path / "out"
    out.mkdir()
    strangers = ["[]", '"text"', "{}", '{"input": 5, "status": "ok"}', '{"input": "y.png", "status": "done"}',
                 json.dumps({"input": "z.png", "status": "ok", "score": 0.5,
                             "outputs": {"npz": {"file": "../z.npz", "sha256": "0"}}}),
                 json.dumps({"input": "w.png", "status": "ok", "score": None,
                             "outputs": {"npz": {"file": "w.png.npz", "sha256": "0"}}}),
                 json.dumps({"input": "v.png", "status": "error", "times_ms": {"total": "<b>"}})]
    (out / "results.jsonl").write_text("\n".join(strangers) + "\n")
    assert _analyze(image, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "8 lines of results.jsonl that are not records" in (out / "report.html").read_text()
    assert list(_csv_rows(out)) == [str(image)]


def test_the_report_reads_nothing_outside_the_output_folder(tmp_path, checkpoint_seed0):
    image = shared_crop(tmp_path / "images" / "x.png", 0, size=(64, 80))
    secret = shared_crop(tmp_path / "secret" / "s.png", 40, size=(64, 80))
    out = tmp_path / "out"
    assert _analyze(image, "--out", out, "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    assert _analyze(secret, "--out", tmp_path / "secret-out", "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    (tmp_path / "secret" / "s.png.npz").write_bytes((tmp_path / "secret-out" / "s.png.npz").read_bytes())
    legit = _records(out)[0]
    crafted = [{**legit, "input": str(tmp_path / "secret" / "s.png"),
                "provenance": {**legit["provenance"], "input_sha256": sha256_file(secret)}},
               {**legit, "input": "y.png", "outputs": {"npz": {"file": "../secret/s.png.npz",
                                                               "sha256": sha256_file(tmp_path / "secret" / "s.png.npz")}}}]
    with open(out / "results.jsonl", "a") as log:
        log.writelines(json.dumps(record) + "\n" for record in crafted)
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    secret_picture = cv2.imread(str(secret), cv2.IMREAD_COLOR)
    with np.load(tmp_path / "secret" / "s.png.npz") as saved:
        secret_map = heatmap_bgr(saved["map"])
    for thumbnail in (out / "report_files").iterdir():
        assert _difference(thumbnail, secret_picture) > 8 or "-image" not in thumbnail.name, thumbnail
        assert "-map" not in thumbnail.name or _difference(thumbnail, secret_map) > 8, thumbnail
    assert "secret/s.png.npz" not in page and "1 line of results.jsonl that is not a record" in page


def test_the_report_keeps_pictures_and_times_after_watch_files_away_and_after_a_resume(tmp_path, torch_runner,
                                                                                       checkpoint_seed0):
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "done"
    shared_crop(inbox / "IMG_0001.png", 0)
    _watch_until(torch_runner, inbox, out, done, lambda: (done / "IMG_0001.png").exists())
    page = build_report(out).read_text()
    [shown] = _page_rows(page).values()
    assert set(shown) == {"image", "localization map", "confidence map", "overlay"}
    assert (done / "IMG_0001.png").resolve().as_uri() in page

    images = tmp_path / "images"
    shared_crop(images / "x.png", 1)
    for _ in range(2):  # the second run reuses the outputs
        assert _analyze(images, "--out", tmp_path / "again", "--checkpoint", checkpoint_seed0, *TORCH).exit_code == 0
    first, second = _records(tmp_path / "again")
    assert second["status"] == "skipped" and second["times_ms"] == {}
    page = build_report(tmp_path / "again").read_text()
    assert f"{first['analysed_at']}</span><br>" in page and re.search(r"inference \d+", page)
    assert _csv_rows(tmp_path / "again")[str(images / "x.png")]["total_ms"] == str(first["times_ms"]["total"])
