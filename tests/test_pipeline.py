"""The pipelined batch and the batch on Ray write what the per-image job, run one image at a
time, writes: byte for byte, on every shared image (the two full-size official ones cropped:
conftest.BATCH_CROPS). A bad image, a resume in the middle, Ctrl-C,
a Ray worker killed mid-run and a runner that breaks each behave as `analyze` promises."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
from trufor_trt.engine.runner import Runner

from conftest import BreaksAfter, cli_process, stop_process, take_model_of

# Every test here stands on the 54 batch images analysed once (a minute on 2 cores).
pytestmark = pytest.mark.slow

OUTPUT_SUFFIXES = (".npz", ".heatmap.png", ".conf.png", ".overlay.png", ".thumb.jpg")
SAME_IN_EVERY_RUN = ("status", "reason", "score", "height", "width", "backend", "precision", "provenance")
FEW = ("pristine1.jpg", "tampered2.png", "cocoglide_sample/real/airplane_383621.png",
       "cocoglide_sample/real/airplane_525322.png", "cocoglide_sample/fake/glide_inpainting_val2017_11813_up.png",
       "cocoglide_sample/fake/glide_inpainting_val2017_127182_up.png")


def _records(out: Path, images: Path) -> dict:
    """Input path relative to `images` -> its records (oldest first); lines about other inputs
    (a copied earlier run's) are left out."""
    records = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not Path(record["input"]).is_relative_to(images):
            continue
        name = Path(record["input"]).relative_to(images).as_posix()
        records.setdefault(name, []).append(record)
    return records


def _same(record: dict, reference: dict, keys=SAME_IN_EVERY_RUN) -> bool:
    return {key: record.get(key) for key in keys} == {key: reference.get(key) for key in keys}


def _outputs_equal(out: Path, reference: Path, names) -> None:
    for name in names:
        for suffix in OUTPUT_SUFFIXES:
            assert (out / f"{name}{suffix}").read_bytes() == (reference / f"{name}{suffix}").read_bytes(), \
                (name, suffix)
    assert not list(out.rglob(".*.tmp"))


def _text(result) -> str:
    """The CLI's output with the console's line wrapping undone."""
    return " ".join(result.output.split())


def _analyze(images, out, model, *extra):
    return CliRunner().invoke(app, ["analyze", str(images), "--out", str(out), "--model", str(model),
                                    "--backend", "onnxruntime", *extra])


def _copy_outputs(reference: Path, out: Path, names) -> None:
    """What a batch that stopped after `names` left: their outputs, and their lines in the log."""
    for name in names:
        for suffix in OUTPUT_SUFFIXES:
            target = out / f"{name}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(reference / f"{name}{suffix}", target)
    lines = [line for line in (reference / "results.jsonl").read_text().splitlines()
             if json.loads(line)["outputs"]["npz"]["file"] in {f"{name}.npz" for name in names}]
    (out / "results.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def names(shared_images) -> list:
    return sorted(path.relative_to(shared_images).as_posix() for path in shared_images.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def sequential(shared_images_analyzed) -> Path:
    return shared_images_analyzed


@pytest.fixture
def few_images(tmp_path, shared_images) -> Path:
    folder = tmp_path / "images"
    for name in FEW:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_images / name, folder / name)
    return folder


def test_two_runners_and_three_host_workers_write_what_the_sequential_job_writes_with_a_bad_image_and_a_resume(
        tmp_path, shared_images, names, sequential, model_seed0):
    images = shutil.copytree(shared_images, tmp_path / "images")
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "out"
    done_before = names[::9]  # a batch that stopped after some images
    _copy_outputs(sequential, out, done_before)

    result = _analyze(images, out, model_seed0, "--streams", "2", "--workers", "3")

    assert result.exit_code == 1, result.output  # the broken image failed, the others were done
    assert f"{len(names) - len(done_before)} analysed, {len(done_before)} skipped (outputs exist), 1 failed" \
        in _text(result)
    _outputs_equal(out, sequential, names)
    records, reference = _records(out, images), _records(sequential, shared_images)
    assert records.pop("zz-broken.jpg")[0]["status"] == "error"
    assert set(records) == set(names) and all(len(lines) == 1 for lines in records.values())
    for name, [record] in records.items():
        assert record["outputs"] == reference[name][0]["outputs"]
        if name in done_before:
            assert record["status"] == "skipped" and _same(record, reference[name][0], SAME_IN_EVERY_RUN[2:])
        else:
            assert _same(record, reference[name][0]), name


def test_ctrl_c_stops_cleanly_and_the_resume_finishes_the_batch(tmp_path, few_images, sequential, model_seed0):
    out, log = tmp_path / "out", tmp_path / "analyze.log"
    process = cli_process(log, "analyze", str(few_images), "--out", str(out), "--model", str(model_seed0),
                          "--backend", "onnxruntime")
    try:
        deadline = time.monotonic() + 300
        while not (out / "results.jsonl").is_file() or not (out / "results.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 130, log.read_text()
    finally:
        stop_process(process)
    assert "stopped by SIGINT" in log.read_text() and "run again to resume" in log.read_text()
    first = _records(out, few_images)
    assert 1 <= len(first) < len(FEW)
    _outputs_equal(out, sequential, first)  # whatever has a record is complete
    assert (out / "results.csv").read_text().count("\n") == 1 + len(first)
    with open(out / "results.jsonl", "a") as results:
        results.write('{"input": "a line a killed run left unfinished')  # as a second Ctrl-C may

    result = _analyze(few_images, out, model_seed0)

    assert result.exit_code == 0, result.output
    assert f"{len(FEW) - len(first)} analysed, {len(first)} skipped" in _text(result)
    _outputs_equal(out, sequential, FEW)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[len(first)].endswith("unfinished")
    assert len([json.loads(line) for index, line in enumerate(lines) if index != len(first)]) == 2 * len(first) + \
        (len(FEW) - len(first))


def test_a_broken_runner_stops_the_batch_with_its_reason(tmp_path, few_images, sequential, model_seed0,
                                                         monkeypatch):
    def load_breaking_runner(*args, **kwargs):
        runner = BreaksAfter(OnnxRuntimeRunner(model_seed0), images=2)
        runner.load()
        return [runner]

    monkeypatch.setattr("trufor_trt.cli.batch_commands.load_runners", load_breaking_runner)
    out = tmp_path / "out"
    result = _analyze(few_images, out, model_seed0)
    assert result.exit_code == 3, result.output
    assert "stopped: GPU 0 fell off the bus" in _text(result)
    records = _records(out, few_images)  # two done, no line for the others (not "failed" each)
    assert [lines[0]["status"] for lines in records.values()] == ["ok", "ok"]
    assert (out / "results.csv").read_text().count("\n") == 3
    _outputs_equal(out, sequential, records)


@pytest.fixture(scope="module")
def ray_run(shared_images, model_seed0, tmp_path_factory):
    """`analyze --ray local` on every shared image: (out, the CLI's output)."""
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    out = tmp_path_factory.mktemp("ray") / "out"
    result = _analyze(shared_images, out, model_seed0, "--ray", "local")
    assert result.exit_code == 0, result.output
    return out, _text(result)


def test_ray_writes_what_the_sequential_job_writes(ray_run, shared_images, names, sequential):
    out, output = ray_run
    assert "Ray: 2 actors, each 1 CPUS and one onnxruntime runner" in output  # a 2-core machine
    assert f"{len(names)} analysed, 0 skipped (outputs exist), 0 failed" in output
    _outputs_equal(out, sequential, names)
    records, reference = _records(out, shared_images), _records(sequential, shared_images)
    assert set(records) == set(names)
    for name, [record] in records.items():
        assert record["outputs"] == reference[name][0]["outputs"] and _same(record, reference[name][0]), name
    assert (out / "results.csv").read_text().count("\n") == 1 + len(names)


def test_a_second_ray_run_skips_everything(ray_run, shared_images, names, model_seed0):
    out, _ = ray_run
    result = _analyze(shared_images, out, model_seed0, "--ray", "local", "--ray-workers", "1")
    assert result.exit_code == 0, result.output
    assert f"0 analysed, {len(names)} skipped (outputs exist), 0 failed" in _text(result)
    assert all(lines[-1]["status"] == "skipped" for lines in _records(out, shared_images).values())


def _ray_workers(command: str) -> list:
    found = subprocess.run(["pgrep", "-f", command], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def test_a_ray_worker_killed_mid_run_is_replaced_and_no_image_is_lost_or_doubled(
        tmp_path, few_images, sequential, model_seed0):
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    out, log = tmp_path / "out", tmp_path / "analyze.log"
    process = cli_process(log, "analyze", str(few_images), "--out", str(out), "--model", str(model_seed0),
                          "--backend", "onnxruntime", "--ray", "local", "--ray-workers", "1", "--ray-cpus", "2")
    try:
        deadline = time.monotonic() + 300
        while not (out / "results.jsonl").is_file() or not (out / "results.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        [worker] = _ray_workers("MapBatches\\(AnalyzeImages\\)")
        os.kill(worker, signal.SIGKILL)
        assert len(_records(out, few_images)) < len(FEW)  # it had images left
        assert process.wait(300) == 0, log.read_text()
    finally:
        stop_process(process)
    records = _records(out, few_images)
    assert sorted(records) == sorted(FEW) and all(len(lines) == 1 for lines in records.values())
    _outputs_equal(out, sequential, FEW)


def test_a_runner_that_breaks_in_a_ray_actor_stops_the_job_with_its_reason(tmp_path, few_images, sequential,
                                                                            model_seed0, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from trufor_trt.cluster import ray_analyze

    class BreaksInTheActor(ray_analyze.AnalyzeImages):
        def __init__(self, spec, options):
            super().__init__(spec, options)
            broken = BreaksAfter(self.runner, images=2)
            take_model_of(broken, self.runner)
            self.runner = broken

    for module in (sys.modules[__name__], sys.modules[BreaksAfter.__module__]):
        ray.cloudpickle.register_pickle_by_value(module)  # the actor's class travels whole
    monkeypatch.setattr(ray_analyze, "AnalyzeImages", BreaksInTheActor)
    out = tmp_path / "out"
    result = _analyze(few_images, out, model_seed0, "--ray", "local", "--ray-workers", "1")
    assert result.exit_code == 3, result.output
    assert "stopped: GPU 0 fell off the bus" in _text(result)
    records = _records(out, few_images)
    assert [lines[0]["status"] for lines in records.values()] == ["ok", "ok"]
    _outputs_equal(out, sequential, records)


class TakesBatches(Runner):
    """A real runner that says it takes up to `limit` images a call and keeps the batches it is
    handed: the subject is how the pipeline groups images, not batched kernels (GPU tests)."""

    def __init__(self, runner: Runner, limit: int):
        super().__init__()
        self.runner, self.limit, self.batches = runner, limit, []
        self.backend, self.precision = runner.backend, runner.precision

    def load(self) -> None:
        self.runner.load()
        take_model_of(self, self.runner)

    def takes_batches(self) -> bool:
        return True

    def batch_limit(self, height: int, width: int) -> int:
        return self.limit

    def infer(self, prepared):
        return self.runner.infer(prepared)

    def infer_batch(self, prepared):
        self.batches.append(prepared.shape)
        return super().infer_batch(prepared)  # the interface's own: one image after the other


def test_batches_hold_consecutive_images_of_one_size_and_change_no_output(
        tmp_path, few_images, sequential, model_seed0, monkeypatch):
    (few_images / "cocoglide_sample/fake/zz-broken.jpg").write_bytes(b"not an image")  # between two batchable
    runner = TakesBatches(OnnxRuntimeRunner(model_seed0), limit=4)
    runner.load()
    monkeypatch.setattr("trufor_trt.cli.batch_commands.load_runners", lambda *args, **kwargs: [runner])
    out = tmp_path / "out"
    result = _analyze(few_images, out, model_seed0, "--batch", "3")
    assert result.exit_code == 1, result.output
    # fake x2 (the broken one passes by), real x1 | real, then 384x256, then 256x256: alone
    assert runner.batches == [(3, 3, 256, 256)]
    assert "6 analysed, 0 skipped (outputs exist), 1 failed" in _text(result)
    _outputs_equal(out, sequential, FEW)


def test_batch_is_refused_where_the_runner_takes_one_image_at_a_time(tmp_path, few_images, model_seed0):
    result = _analyze(few_images, tmp_path / "out", model_seed0, "--batch", "2")
    assert result.exit_code == 2
    assert "--batch 2: this onnxruntime runner takes one image at a time" in _text(result)
