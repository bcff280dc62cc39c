"""`trufor-trt watch`: complete files only, each image once across a `kill -9`, outputs equal
`analyze`'s; and the folder logic (settling, hidden files, filing originals) on its own."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trufor_trt.files import sha256_bytes
from trufor_trt.service.inbox import Inbox, OriginalChanged, file_away

from conftest import REPO, cli_process, stop_process

SETTLE = 1.0
DEADLINE = 300  # seconds for the whole run on a 2-core machine


def test_a_file_is_ready_only_once_unchanged_for_the_settle_time(tmp_path):
    inbox = Inbox(tmp_path, settle=0.3, exclude=[tmp_path / "out"])
    (tmp_path / "a.png").write_bytes(b"first part")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "b.jpg.part").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c.png").write_bytes(b"x")
    assert inbox.scan() == [] and inbox.settling()
    time.sleep(0.2)
    with open(tmp_path / "a.png", "ab") as growing:
        growing.write(b", second part")
    assert inbox.scan() == []  # changed: the wait starts again
    time.sleep(0.35)
    ready = inbox.scan()
    assert [job.relative for job, _ in ready] == ["a.png"] and not inbox.settling()


def test_filing_away_keeps_the_relative_name_never_overwrites_and_moves_only_the_analysed_bytes(tmp_path):
    source = tmp_path / "in" / "day1" / "IMG_1.jpg"
    source.parent.mkdir(parents=True)
    for content in (b"one", b"two"):
        source.write_bytes(content)
        place = file_away(source, tmp_path / "done" / "day1" / "IMG_1.jpg", sha256_bytes(content))
        assert not source.exists() and place.read_bytes() == content
    assert (tmp_path / "done" / "day1" / "IMG_1.jpg").read_bytes() == b"one"
    assert (tmp_path / "done" / "day1" / "IMG_1-2.jpg").read_bytes() == b"two"
    source.write_bytes(b"three")
    with pytest.raises(OriginalChanged):
        file_away(source, tmp_path / "done" / "day1" / "IMG_1.jpg", sha256_bytes(b"what was analysed"))
    assert source.read_bytes() == b"three" and len(list((tmp_path / "done" / "day1").iterdir())) == 2


def _records(out: Path) -> list:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _write_slowly(path: Path, data: bytes, pieces: int = 4, pause: float = SETTLE / 3) -> None:
    """A camera writing in pieces, pausing less than the settle time between them."""
    size = -(-len(data) // pieces)
    with open(path, "wb") as sink:
        for start in range(0, len(data), size):
            sink.write(data[start:start + size])
            sink.flush()
            time.sleep(pause)


def _wait_for(condition, what: str, process) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert process.poll() is None, f"watch exited while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def watched(model_seed0, service_images, tmp_path_factory):
    """A watch run as a capture point sees it: images there at start and a bad one, more copied
    in (one slowly), `kill -9` mid-run, a restart, SIGTERM. (folders, the exit code)."""
    root = tmp_path_factory.mktemp("watch")
    inbox, out, done, failed = (root / name for name in ("inbox", "out", "done", "failed"))
    inbox.mkdir()
    images = sorted(service_images.iterdir())
    for image in images[:4]:
        (inbox / image.name).write_bytes(image.read_bytes())
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    command = ["watch", str(inbox), "--out", str(out), "--done", str(done), "--failed", str(failed),
               "--model", str(model_seed0), "--backend", "onnxruntime", "--settle", str(SETTLE), "--poll", "1",
               "--retry-truncated", "2"]
    first = cli_process(root / "watch.log", *command)
    try:
        _wait_for(lambda: any(record["status"] == "ok" for record in _records(out)), "first image", first)
        first.send_signal(signal.SIGKILL)  # in the middle of the next image, most likely
        first.wait(30)
    finally:
        stop_process(first)
    second = cli_process(root / "watch.log", *command)
    try:
        writer = threading.Thread(target=_write_slowly, args=(inbox / images[4].name, images[4].read_bytes()))
        writer.start()
        for image in images[5:]:
            (inbox / image.name).write_bytes(image.read_bytes())
        writer.join()
        _wait_for(lambda: len(list(done.iterdir())) == len(images) if done.is_dir() else False, "all images",
                  second)
        _wait_for(lambda: not any(inbox.iterdir()), "an empty inbox", second)
    finally:
        code = stop_process(second)
    return {"inbox": inbox, "out": out, "done": done, "failed": failed, "images": images, "code": code,
            "log": (root / "watch.log").read_text()}


def test_every_good_image_is_analysed_exactly_once_across_a_kill(watched):
    assert watched["code"] == 0, watched["log"]
    records = _records(watched["out"])
    for image in watched["images"]:
        mine = [record for record in records if Path(record["input"]).name == image.name]
        finished = [record for record in mine if record["status"] in ("ok", "skipped")]
        assert len(finished) == 1 and not [r for r in mine if r["status"] == "error"], (image.name, mine)
    broken = [record for record in records if record["input"].endswith("broken.png")]
    assert [record["status"] for record in broken] == ["error"] and "PNG" in broken[0]["reason"]


def test_outputs_equal_analyze_byte_for_byte_with_no_partial_file(watched, analyzed_service_images):
    out = watched["out"]
    for image in watched["images"]:
        for suffix in (".npz", ".heatmap.png", ".conf.png", ".overlay.png"):
            assert (out / f"{image.name}{suffix}").read_bytes() == \
                (analyzed_service_images / f"{image.name}{suffix}").read_bytes(), (image.name, suffix)
    leftovers = [path.name for path in out.rglob(".*")]
    assert leftovers == [], leftovers


def test_originals_are_filed_away_intact_after_their_outputs(watched):
    assert not any(watched["inbox"].iterdir())
    for image in watched["images"]:
        assert (watched["done"] / image.name).read_bytes() == image.read_bytes()
        assert (watched["out"] / f"{image.name}.npz").stat().st_mtime_ns <= \
            (watched["done"] / image.name).stat().st_ctime_ns
    assert [path.name for path in watched["failed"].iterdir()] == ["broken.png"]


def test_watch_refuses_an_output_folder_inside_the_inbox(tmp_path, model_seed0):
    from typer.testing import CliRunner

    from trufor_trt.cli import app

    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out"),
                                      "--model", str(model_seed0)])
    assert result.exit_code == 2 and "inside INBOX" in result.output
    assert os.listdir(tmp_path / "in") == []  # refused before anything was made or loaded


def test_a_second_watch_on_an_inbox_is_refused_in_one_line(tmp_path, model_seed0):
    import fcntl

    (tmp_path / "in").mkdir()
    first = os.open(tmp_path / "in", os.O_RDONLY)  # the lock a first watch holds on its inbox
    fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        second = subprocess.run([sys.executable, "-m", "trufor_trt", "watch", str(tmp_path / "in"), "--out",
                                 str(tmp_path / "out"), "--model", str(model_seed0)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        os.close(first)
    assert second.returncode == 2, second.stderr
    assert "another trufor-trt watch is watching it" in second.stderr and len(second.stderr.splitlines()) == 1


def test_a_file_whose_writer_pauses_past_the_settle_time_is_retried_not_failed(tmp_path, model_seed0,
                                                                                  service_images):
    """Half an image, then a pause longer than --settle, then the rest: the half reads as
    truncated and is left for later, not recorded or filed as failed; the whole is analysed."""
    from trufor_trt.batch.analyze import AnalyzeOptions
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
    from trufor_trt.service.watch import Watch, WatchOptions

    inbox, out, done, failed = (tmp_path / name for name in ("inbox", "out", "done", "failed"))
    inbox.mkdir()
    data = min(service_images.glob("*.png"), key=lambda path: path.stat().st_size).read_bytes()
    camera = open(inbox / "camera.png", "wb")
    camera.write(data[:len(data) // 2])
    camera.flush()
    records, stop = [], threading.Event()
    options = WatchOptions(AnalyzeOptions(out_dir=out, write_png=False), done_dir=done, failed_dir=failed,
                           poll=0.2, settle=0.2)  # --retry-truncated's 30 s
    with OnnxRuntimeRunner(model_seed0) as runner:
        worker = threading.Thread(target=Watch(inbox, runner, options, stop, records.append, print).run)
        worker.start()
        try:
            time.sleep(2.0)  # ten times the settle time: read (as truncated) more than once
            assert records == [] and (inbox / "camera.png").is_file() and not failed.exists()
            camera.write(data[len(data) // 2:])
            camera.close()
            deadline = time.monotonic() + DEADLINE
            while not records and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            worker.join(60)
    assert [record.status for record in records] == ["ok"], records
    assert (done / "camera.png").read_bytes() == data


@pytest.mark.parametrize("unit", ["trufor-trt-watch.service", "trufor-trt-serve.service"])
def test_the_systemd_units_run_commands_the_cli_takes(unit):
    """The unit files' ExecStart lines use options that exist: on this machine their paths do not,
    so each stops at its first setup check, never at a usage error."""
    import shlex

    from typer.testing import CliRunner

    from trufor_trt.cli import app

    text = (Path(__file__).resolve().parents[1] / "deploy" / unit).read_text().replace("\\\n", " ")
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    arguments = shlex.split(exec_start.split("=", 1)[1])[1:]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and "No such option" not in result.output and "Usage:" not in result.output
    assert "/srv/capture/inbox" in result.output or "/var/lib/trufor-trt/model" in result.output, result.output
