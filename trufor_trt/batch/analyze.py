"""The per-image job behind every way in (`analyze`, `watch`, `serve`), in stages that
`run_job` chains in one thread and batch/pipeline.py overlaps across threads; and the results log.

Per image: decode -> prepare -> infer (any runner) -> postprocess -> write, each stage timed;
one JSON line per image in `results.jsonl`. A bad image gets a one-line reason and the batch
goes on; existing outputs are skipped unless overwrite is asked for, so a batch can resume.
"""

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine.decode import DEFAULT_MAX_PIXELS, decode_bytes, decode_image
from ..engine.postprocess import Analysis, postprocess
from ..engine.preprocess import prepare_input
from ..engine.runner import RawOutputs, Runner
from ..engine.timing import StageClock
from ..errors import RunnerFailure, TruforError, one_line
from ..files import remove_stale_temporaries, write_atomically
from .inputs import ImageJob
from .outputs import OutputPaths, heatmap_png, npz_bytes, overlay_png
from .provenance import input_sha256, provenance, read_saved, why_redo
from .summary import RESULTS_FILE, write_summary_csv


@dataclass(frozen=True)
class AnalyzeOptions:
    out_dir: Optional[Path]  # None: analyse only, write nothing (`serve` without --out)
    save_noiseprint: bool = False
    write_png: bool = True
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class JobResult:
    record: dict  # the line results.jsonl gets
    analysis: Optional[Analysis] = None  # when the image was analysed in this job
    error: Optional[BaseException] = None  # why it failed, when it did


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TruforError) and hasattr(exc, "reason"):
        return exc.reason
    return one_line(exc)


@dataclass
class ImageInFlight:
    """One image between the job's stages; the pipeline hands it from thread to thread."""

    job: ImageJob
    clock: StageClock
    result: Optional[JobResult] = None  # None for analyse_file, which raises instead
    paths: Optional[OutputPaths] = None
    rgb: Optional[np.ndarray] = None
    prepared: Optional[np.ndarray] = None
    raw: Optional[RawOutputs] = None
    analysis: Optional[Analysis] = None
    done: bool = False  # failed, or its outputs reused: the later stages pass it by


# The stage sequence, once: decode + prepare -> infer -> postprocess (-> write, in finish_job).
def _decode(flight: ImageInFlight, runner: Runner, max_pixels: int) -> None:
    job, clock = flight.job, flight.clock
    with clock.stage("decode"):
        if job.data is None:
            flight.rgb = decode_image(job.path, max_pixels=max_pixels, admit=runner.refusal)
        else:
            flight.rgb = decode_bytes(job.data, job.path, max_pixels=max_pixels, admit=runner.refusal)
    with clock.stage("preprocess"):
        flight.prepared = prepare_input(flight.rgb)


def _infer(flight: ImageInFlight, runner: Runner) -> None:
    with flight.clock.stage("inference"):
        flight.raw = runner.infer(flight.prepared)
    flight.prepared = None  # the largest array of the image: free it as soon as it is used


def _postprocess(flight: ImageInFlight, detection_head) -> None:
    with flight.clock.stage("postprocess"):
        flight.analysis = postprocess(flight.raw, detection_head)
    flight.raw = None


def analyse_file(path, runner: Runner, clock: StageClock, max_pixels: int = DEFAULT_MAX_PIXELS,
                 data: Optional[bytes] = None):
    """decode -> prepare -> infer -> postprocess, each stage timed; returns (rgb, Analysis).
    `data`: the image's bytes when it is not read from `path` (an upload). Raises on failure."""
    flight = ImageInFlight(ImageJob(Path(path), "", data), clock)
    _decode(flight, runner, max_pixels)
    _infer(flight, runner)
    _postprocess(flight, runner.detection_head)
    return flight.rgb, flight.analysis


def _write_outputs(paths: OutputPaths, rgb, analysis: Analysis, options: AnalyzeOptions,
                   made_by: dict) -> None:
    write_atomically(paths.npz, npz_bytes(analysis, options.save_noiseprint, made_by))
    if options.write_png:
        write_atomically(paths.heatmap, heatmap_png(analysis.localization_map))
        write_atomically(paths.confidence, heatmap_png(analysis.confidence_map))
        write_atomically(paths.overlay, overlay_png(rgb, analysis.localization_map))


def _reusable(expected: list, made_by: dict):
    """(the existing outputs' record fields, or None to analyse, and why they are redone)."""
    if not all(path.is_file() for path in expected):
        return None, None
    saved = read_saved(expected[0])
    why = why_redo(saved[0] if saved else None, made_by)
    if why is not None:
        return None, why
    _, score, (height, width) = saved
    return {"status": "skipped", "reason": "outputs exist from the same input, model, backend "
            "and precision (use --overwrite to redo)", "score": score, "height": height,
            "width": width}, None


def open_job(job: ImageJob, runner: Runner, options: AnalyzeOptions) -> ImageInFlight:
    """The image's record, before any stage; done already when its outputs can be reused
    (existing outputs are reused only when their provenance matches this run's)."""
    paths = OutputPaths.below(options.out_dir, job.relative) if options.out_dir is not None else None
    expected = paths.expected(options.write_png) if paths is not None else []
    made_by = provenance(input_sha256(job.path, job.data), runner)
    record = {"input": str(job.path), "outputs": [str(path) for path in expected],
              "status": "ok", "reason": None, "score": None, "height": None, "width": None,
              "backend": runner.backend, "precision": runner.precision, "times_ms": {},
              "provenance": made_by}
    flight = ImageInFlight(job, StageClock(), JobResult(record), paths)
    if paths is not None and not options.overwrite:
        reused, record["reason"] = _reusable(expected, made_by)
        if reused is not None:
            record.update(reused)
            flight.done = True
    return flight


def _contained(flight: ImageInFlight, stage, *args) -> None:
    """Run a stage unless the image is done; a failure becomes the image's record (one bad image
    must not stop the batch), except the runner's own, which stops it."""
    if flight.done:
        return
    try:
        stage(flight, *args)
    except RunnerFailure:
        raise
    except Exception as exc:
        _failed(flight, exc)


def _failed(flight: ImageInFlight, exc: Exception) -> None:
    flight.result.record.update(status="error", reason=_one_line(exc), outputs=[])
    flight.result.error, flight.done = exc, True
    flight.rgb = flight.prepared = flight.raw = None


def decode_job(flight: ImageInFlight, runner: Runner, options: AnalyzeOptions) -> None:
    _contained(flight, _decode, runner, options.max_pixels)


def infer_job(flight: ImageInFlight, runner: Runner) -> None:
    _contained(flight, _infer, runner)


def infer_jobs(flights: list, runner: Runner) -> None:
    """Inference for decoded images of one size, in one runner call when there are several (each
    image's time: its share of the batch's). If the batch fails, each image is tried alone, so a
    failure stays the failing image's."""
    waiting = [flight for flight in flights if not flight.done]
    if len(waiting) < 2:
        for flight in waiting:
            infer_job(flight, runner)
        return
    start = time.perf_counter_ns()
    try:
        raws = runner.infer_batch(np.concatenate([flight.prepared for flight in waiting]))
    except RunnerFailure:
        raise
    except Exception:
        for flight in waiting:
            infer_job(flight, runner)
        return
    share = (time.perf_counter_ns() - start) / 1e6 / len(waiting)
    for flight, raw in zip(waiting, raws):
        flight.raw, flight.prepared = raw, None
        flight.clock.add("inference", share)


def _postprocess_and_write(flight: ImageInFlight, detection_head, options: AnalyzeOptions) -> None:
    _postprocess(flight, detection_head)
    record = flight.result.record
    if flight.paths is not None:
        with flight.clock.stage("write"):
            _write_outputs(flight.paths, flight.rgb, flight.analysis, options, record["provenance"])
    height, width = flight.rgb.shape[:2]
    record.update(score=flight.analysis.score, height=height, width=width)
    flight.result.analysis = flight.analysis


def finish_job(flight: ImageInFlight, detection_head, options: AnalyzeOptions) -> JobResult:
    """Postprocess and write (when there is an output folder); the record gets its times, their
    total being the image's own work (time spent waiting between stages is not its)."""
    _contained(flight, _postprocess_and_write, detection_head, options)
    flight.rgb = None
    if flight.clock.times_ms:  # some stage ran
        times = dict(flight.clock.times_ms)
        times["total"] = round(sum(times.values()), 3)
        flight.result.record["times_ms"] = times
    return flight.result


def run_job(job: ImageJob, runner: Runner, options: AnalyzeOptions) -> JobResult:
    """One image through every stage in this thread; never raises for a bad image (the record
    says what happened), only RunnerFailure when the runner itself broke."""
    flight = open_job(job, runner, options)
    decode_job(flight, runner, options)
    infer_job(flight, runner)
    return finish_job(flight, runner.detection_head, options)


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as existing:
        existing.seek(-1, 2)
        return existing.read(1) != b"\n"


class ResultsLog:
    """An output folder's results.jsonl, open for appending: one flushed line per record, so a
    killed run loses nothing it finished; results.csv is rewritten when the log closes."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.summary = Counter()  # records per status: ok, error, skipped
        self._file = None

    def __enter__(self) -> "ResultsLog":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        path = self.out_dir / RESULTS_FILE
        unterminated = _ends_mid_line(path)
        self._file = open(path, "a", encoding="utf-8")
        if unterminated:  # a run killed while writing a line: the next record starts its own
            self._file.write("\n")
        return self

    def add(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.summary[record["status"]] += 1

    def write_summary(self) -> None:
        write_summary_csv(self.out_dir)

    def __exit__(self, *exc_info) -> None:
        self._file.close()
        self.write_summary()
