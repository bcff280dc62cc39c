"""Evidence that can be trusted across runs: resume only on matching provenance, several input
roots kept apart, results.csv, one-line setup errors before any model loads, and nothing left
behind by a process killed mid-write."""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app

from conftest import make_checkpoint, shared_crop

pytestmark = pytest.mark.shared


def _analyze(*args):
    return CliRunner().invoke(app, ["analyze", *map(str, args), "--no-png"])


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def days(tmp_path):
    """Two camera dumps that both hold a (different) IMG_0001.png."""
    day_a = shared_crop(tmp_path / "cam" / "dayA" / "IMG_0001.png", 0).parent
    day_b = shared_crop(tmp_path / "cam" / "dayB" / "IMG_0001.png", 1).parent
    shared_crop(day_b / "IMG_0002.png", 2)
    return day_a, day_b


def test_another_checkpoint_or_backend_redoes_and_the_same_run_reuses_with_score(
        tmp_path, days, checkpoint_seed0, model_seed0):
    day_a, _ = days
    out = tmp_path / "r"
    other = make_checkpoint(tmp_path / "seed1.pth.tar", 1)
    runs = [("--checkpoint", checkpoint_seed0, "--backend", "torch"),
            ("--checkpoint", checkpoint_seed0, "--backend", "torch"),
            ("--model", model_seed0, "--backend", "onnxruntime"),
            ("--checkpoint", other, "--backend", "torch")]
    for run in runs:
        assert _analyze(day_a, "--out", out, *run).exit_code == 0
    first, again, other_backend, other_model = _records(out)
    assert again["status"] == "skipped" and again["score"] == first["score"]
    assert again["provenance"] == first["provenance"] and (again["height"], again["width"]) == (48, 64)
    assert other_backend["status"] == "ok" and other_backend["reason"] == "redone: made by another backend"
    assert other_backend["provenance"]["model_sha256"] == first["provenance"]["model_sha256"]
    assert other_model["status"] == "ok" and other_model["reason"] == "redone: made by another model"
    assert other_model["provenance"]["model_sha256"] != first["provenance"]["model_sha256"]


def test_outputs_without_provenance_are_redone(tmp_path, days, checkpoint_seed0):
    day_a, _ = days
    out = tmp_path / "r"
    out.mkdir()
    np.savez(out / "IMG_0001.png.npz", map=np.zeros((48, 64)), conf=np.zeros((48, 64)),
             score=np.float64(0.5), imgsize=np.array([48, 64]))
    assert _analyze(day_a, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch").exit_code == 0
    assert _records(out)[-1]["reason"] == "redone: the outputs carry no provenance"


def test_several_roots_with_the_same_file_names_are_all_analysed(tmp_path, days, checkpoint_seed0):
    day_a, day_b = days
    out = tmp_path / "r"
    result = _analyze(day_a, day_b, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert [record["status"] for record in _records(out)] == ["ok", "ok", "ok"]
    for name in ("dayA/IMG_0001.png.npz", "dayB/IMG_0001.png.npz", "dayB/IMG_0002.png.npz"):
        assert (out / name).is_file()
    rerun = _analyze(day_a, day_b, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch")
    assert rerun.exit_code == 0 and [r["status"] for r in _records(out)[3:]] == ["skipped"] * 3
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Reused evidence is valid evidence: ok, and said reused (issue 41).
    assert len(rows) == 3 and {(row["status"], row["reused"]) for row in rows} == {("ok", "True")}
    assert all(row["score"] and row["input_sha256"] and row["model_sha256"] for row in rows)


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
    return int(finished.stdout)


def test_a_killed_writers_leftovers_are_removed_by_the_next_run(tmp_path, days, checkpoint_seed0,
                                                                isolated_cache):
    day_a, _ = days
    out = tmp_path / "r"
    dead = _dead_pid()
    (out / "nested").mkdir(parents=True)
    stale = [out / f".IMG_0001.png.npz.{dead}.tmp", out / "nested" / f".x.overlay.png.{dead}.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    alive = out / f".other.npz.{os.getppid()}.tmp"  # a live process's file is left alone
    alive.write_bytes(b"in use")
    assert _analyze(day_a, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch").exit_code == 0
    assert not any(path.exists() for path in stale) and alive.exists()

    staging = isolated_cache / "models" / f".0123456789abcdef.partial-{dead}"
    (staging / "deep").mkdir(parents=True)
    (staging / "deep" / "trufor_fp32.onnx").write_bytes(b"\0" * 1024)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    result = _analyze(day_a, "--out", out, "--checkpoint", junk, "--backend", "onnxruntime")
    assert result.exit_code == 2 and not staging.exists()


def _setup_error(args: list) -> str:
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert elapsed < 1.0, elapsed
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_each_setup_mistake_is_one_line_and_exit_2_within_a_second(tmp_path, days):
    day_a, _ = days
    image = day_a / "IMG_0001.png"
    missing = tmp_path / "no-such.pth.tar"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    loop = tmp_path / "loop.png"
    loop.symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(loop)
    assert "no such file" in _setup_error(["analyze", str(image), "--out", str(tmp_path / "o"),
                                           "--checkpoint", str(missing)])
    assert "no such file" in _setup_error(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "m")])
    assert "is a file, not a folder" in _setup_error(["analyze", str(image), "--out", str(a_file),
                                                      "--checkpoint", str(missing)])
    assert "cannot be written" in _setup_error(["analyze", str(image), "--out", str(a_file / "sub"),
                                                "--checkpoint", str(missing)])
    assert "symbolic link loop" in _setup_error(["analyze", str(loop), "--out", str(tmp_path / "o"),
                                                 "--checkpoint", str(missing)])


def test_broken_and_looping_links_in_a_folder_get_a_record_each(tmp_path, days, checkpoint_seed0):
    day_a, _ = days
    (day_a / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (day_a / "a.jpg").symlink_to(day_a / "b.jpg")
    (day_a / "b.jpg").symlink_to(day_a / "a.jpg")
    out = tmp_path / "r"
    result = _analyze(day_a, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch")
    assert result.exit_code == 1
    reasons = {record["input"]: record["reason"] for record in _records(out) if record["status"] == "error"}
    assert reasons == {str(day_a / name): "broken or looping symbolic link"
                       for name in ("a.jpg", "b.jpg", "gone.png")}


def test_logs_get_a_line_per_image_and_quiet_keeps_failures_only(tmp_path, days, checkpoint_seed0):
    _, day_b = days
    (day_b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    out = tmp_path / "r"
    logged = _analyze(day_b, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch")
    assert logged.exit_code == 1
    lines = logged.output.strip().splitlines()
    for name in ("IMG_0001.png", "IMG_0002.png"):
        assert any(line.startswith(str(day_b / name)) and ": score 0." in line and line.endswith(" s")
                   for line in lines), lines
    assert any(line.startswith(f"failed {day_b / 'broken.png'}: ") for line in lines)
    assert lines[-1].startswith("2 analysed, 0 skipped (outputs exist), 1 failed")
    quiet = _analyze(day_b, "--out", out, "--checkpoint", checkpoint_seed0, "--backend", "torch",
                     "--quiet")
    kept = [line for line in quiet.output.strip().splitlines()[:-1] if not line.startswith("warning: checkpoint")]
    assert [line.split(":")[0] for line in kept] == [f"failed {day_b / 'broken.png'}"]


def test_a_missing_package_names_the_extra_that_brings_it(tmp_path):
    hidden = tmp_path / "site"
    (hidden / "onnx").mkdir(parents=True)
    (hidden / "onnx" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnx'\", name='onnx')\n")
    environment = {**os.environ, "PYTHONPATH": str(hidden)}
    result = subprocess.run([sys.executable, "-m", "trufor_trt", "selftest"], capture_output=True,
                            text=True, env=environment, timeout=300)
    assert result.returncode == 2
    assert "this needs the 'onnx' package: pip install \"trufor-trt[export]\"" in result.stderr
