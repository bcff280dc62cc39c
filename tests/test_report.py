"""The batch report: every image of the shared set with its results.jsonl score, failures with
their reasons, file names shown as text (never markup), the same page when rebuilt, and the page
as a real browser renders it (Debian's Chromium, where installed)."""

import html
import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app

from conftest import BROWSER_FLAGS, CHROMIUM, rendered_dom

# Every test here stands on the 54 batch images analysed once (a minute on 2 cores).
pytestmark = pytest.mark.slow

HOSTILE_NAME = "<script>alert(1)</script>.png"


def _text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def reported(shared_images, shared_images_analyzed, model_seed0, tmp_path_factory):
    """The shared images' output folder, plus a file with a hostile name and a broken one analysed
    into it by `analyze --report`: (out, its latest records by input, the page)."""
    out = shutil.copytree(shared_images_analyzed, tmp_path_factory.mktemp("report") / "out")
    extra = tmp_path_factory.mktemp("extra")
    hostile = extra / HOSTILE_NAME  # a folder "<script>alert(1)<" holding "script>.png"
    hostile.parent.mkdir()
    shutil.copy(shared_images / "tampered2.png", hostile)
    (extra / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    result = CliRunner().invoke(app, ["analyze", str(extra), "--out", str(out), "--model", str(model_seed0),
                                      "--backend", "onnxruntime", "--report"])
    assert result.exit_code == 1, result.output  # the broken image
    assert f"report: {out / 'report.html'}" in _text(result)
    records = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["input"]] = record
    return out, records, (out / "report.html").read_text()


def test_every_image_is_listed_with_its_score_and_every_failure_with_its_reason(reported):
    out, records, page = reported
    assert len(records) == 56
    rows = re.findall(r'data-name="([^"]*)" data-score="([^"]*)"', page)
    assert len(rows) == 56
    shown = {html.unescape(name): score for name, score in rows}
    for name, record in records.items():
        if record["status"] == "error":
            assert shown[name] == "-1" and html.escape(record["reason"]) in page
        else:
            assert shown[name] == f"{record['score']:.6f}" and f"{record['score']:.4f}" in page
    assert "56, <strong>" in page and "1 failed" in page
    # Sizes as height x width, as the CLI and the .npz's imgsize say them (issue 41): 384x256 is 256 high.
    assert "<th>Size (H x W)</th>" in page and ">256 x 384<" in page and ">384 x 256<" not in page
    thumbnails = re.findall(r'src="\./(report_files/[^"]+)"', page)
    assert len(thumbnails) == 55 * 4  # image, map, confidence, overlay of each analysed image
    assert all((out / link).is_file() for link in thumbnails)


def test_a_file_name_is_text_not_markup(reported):
    _, _, page = reported
    assert HOSTILE_NAME not in page
    assert html.escape(HOSTILE_NAME, quote=True) in page
    assert page.count("<script>") == 1  # the page's own


def test_rebuilding_gives_the_same_page(reported, tmp_path):
    out, _, page = reported
    thumbnails = {path.name: path.read_bytes() for path in (out / "report_files").iterdir()}
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").read_text() == page
    assert {path.name: path.read_bytes() for path in (out / "report_files").iterdir()} == thumbnails
    elsewhere = tmp_path / "pages" / "batch.html"
    assert CliRunner().invoke(app, ["report", str(out), "--to", str(elsewhere)]).exit_code == 0
    links = re.findall(r'src="([^"]+\.jpg)"', elsewhere.read_text())
    assert links and all((elsewhere.parent / link).resolve().is_file() for link in links)


def test_report_of_a_folder_without_results_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "has no results.jsonl" in _text(result)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_page_sorts_it_and_shows_the_hostile_name_as_text(reported, tmp_path):
    out, records, _ = reported
    profile = tmp_path / "profile"
    dom = rendered_dom(out / "report.html", profile)
    assert "56 of 56 shown" in dom  # the page's script ran
    assert html.escape(HOSTILE_NAME, quote=False) in dom and HOSTILE_NAME not in dom
    scores = [float(score) for score in re.findall(r'data-score="([^"]*)"', dom)]
    assert scores == sorted(scores, reverse=True)
    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                    "--window-size=1280,900", f"--screenshot={screenshot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_that_look_like_urls_or_reorder_text_stay_files_and_text(model_seed0, tmp_path):
    """A name is never a link target of its own (`javascript:`, `http:` stay files beside the
    page, percent-encoded), bidirectional controls are shown as escapes, and the page runs its
    own script alone (a Content-Security-Policy with that script's hash)."""
    import base64
    import hashlib

    from conftest import shared_crop

    images = tmp_path / "in"
    names = ["javascript:alert(1).png", "http:example.org.png", "photo\u202egnp.exe.png"]
    for index, name in enumerate(names):
        shared_crop(images / name, index)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(images), "--out", str(out), "--model", str(model_seed0),
                                      "--backend", "onnxruntime", "--report", "--no-png"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    targets = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert targets and all(target.startswith(("./", "data:", "file://")) for target in targets), targets
    assert "./javascript%3Aalert%281%29.png.npz" in targets and "./http%3Aexample.org.png.npz" in targets
    assert "\u202e" not in page and "photo\\u202egnp.exe.png" in page
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
