"""The per-image job behind every way in (`analyze`, `watch`, `serve`), in stages that
`run_job` chains in one thread and batch/pipeline.py overlaps across threads.

Per image: decode -> prepare -> infer (any runner) -> postprocess -> write its unit of outputs,
each stage timed; one record per image (results_log.py keeps them). A bad image gets a one-line
reason and the batch goes on. An existing unit is reused (the image skipped) only when it stands
for this image, so a batch can resume; one holding another input's evidence is never replaced
unless overwrite is asked for.
"""

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from trufor_trt.engine.decode import (DEFAULT_DECODE_SECONDS, DEFAULT_MAX_FILE, DEFAULT_MAX_PIXELS, decode_bytes,
                                      read_image_file)
from trufor_trt.engine.postprocess import Analysis, postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.runner import RawOutputs, Runner
from trufor_trt.engine.timing import StageClock
from trufor_trt.errors import ImageError, RunnerFailure, TruforError, one_line
from trufor_trt.files import sha256_bytes, sha256_file
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.outputs import OutputNameError, OutputPaths, write_unit
from trufor_trt.batch.provenance import provenance, read_saved, why_redo
from trufor_trt.batch.records import Record, utc_now


@dataclass(frozen=True)
class AnalyzeOptions:
    out_dir: Optional[Path]  # None: analyse only, write nothing (`serve` without --out)
    save_noiseprint: bool = False
    write_png: bool = True
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE  # an image file larger is refused before it is read
    decode_seconds: float = DEFAULT_DECODE_SECONDS  # decode.decode_allowance's


@dataclass
class JobResult:
    record: Record  # the line results.jsonl gets
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
    unreadable: Optional[ImageError] = None  # why its file could not be read, said when it is decoded


# The stage sequence, once: decode + prepare -> infer -> postprocess (-> write, in finish_job).
def _decode(flight: ImageInFlight, runner: Runner, max_pixels: int, decode_seconds: float) -> None:
    job, clock = flight.job, flight.clock
    with clock.stage("decode"):
        if flight.unreadable is not None:
            raise flight.unreadable
        flight.rgb = decode_bytes(job.data, job.path, max_pixels, runner.refusal, decode_seconds)
        flight.job = replace(job, data=None)  # decoded: the bytes are not needed any more
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
    flight = _read_once(ImageJob(Path(path), "", data), clock, DEFAULT_MAX_FILE)
    _decode(flight, runner, max_pixels, DEFAULT_DECODE_SECONDS)
    _infer(flight, runner)
    _postprocess(flight, runner.detection_head)
    return flight.rgb, flight.analysis


def _holds_another_input(paths: OutputPaths, saved, made_by: dict, holder: Optional[Record], name: str) -> bool:
    """Whether the unit holds the evidence of another input: the log's record of it names
    another input, and the .npz (`saved`: read_saved's) was made from other bytes than this
    input's."""
    if holder is None or holder.input == name or not paths.npz.is_file():
        return False
    return saved is None or not isinstance(saved[0], dict) or saved[0].get("input_sha256") != made_by["input_sha256"]


def _reused(paths: OutputPaths, kinds: tuple, saved, made_by: dict, holder: Optional[Record]):
    """(the record fields of the existing unit, or None to analyse, and why it is redone). A
    unit is reused only when its provenance matches this run's and every file is the one the
    results log's latest record of it names (a unit another run or a kill left mixed is not)."""
    if not all(paths.path(kind).is_file() for kind in kinds):
        return None, None
    why = why_redo(saved[0] if saved else None, made_by)
    if why is not None:
        return None, why
    unrecorded = "redone: the outputs are not those the results log records"
    if holder is None:
        return None, unrecorded
    outputs = {kind: {"file": paths.file(kind), "sha256": sha256_file(paths.path(kind))} for kind in kinds}
    if any(holder.outputs.get(kind) != entry for kind, entry in outputs.items()):
        return None, unrecorded
    found, score, (height, width) = saved
    return {"status": "skipped", "reason": "outputs exist from the same input, model, backend "
            "and precision (use --overwrite to redo)", "score": score, "height": height,
            "width": width, "outputs": outputs, "provenance": found}, None


def _check_existing_unit(flight: ImageInFlight, options: AnalyzeOptions, holder: Optional[Record]) -> None:
    """Refuse the image if its output name holds another input's evidence (unless overwrite),
    or reuse the unit when it stands for this image already."""
    record, paths = flight.result.record, flight.paths
    saved = read_saved(paths.npz) if paths.npz.is_file() else None
    if _holds_another_input(paths, saved, record.provenance, holder, record.input):
        if not options.overwrite:
            record.status = "error"
            record.reason = (f"output name {paths.name!r} holds the evidence of {holder.input} (another input): "
                             "--overwrite replaces it, or choose another --out")
            flight.done = True
            return
        record.reason = f"redone: replaced the evidence of {holder.input}"
    if options.overwrite:
        return
    reused, why = _reused(paths, paths.kinds(options.write_png), saved, record.provenance, holder)
    record.reason = record.reason or why
    if reused is not None:
        flight.result.record = replace(record, **reused)
        flight.done = True


def _read_once(job: ImageJob, clock: StageClock, max_bytes: int) -> ImageInFlight:
    """The image in flight with its bytes, read once (bounded): the bytes its record's SHA-256
    names are the bytes decoded, whatever happens to the file meanwhile."""
    if job.data is not None:
        return ImageInFlight(job, clock)
    try:
        return ImageInFlight(replace(job, data=read_image_file(job.path, max_bytes)), clock)
    except ImageError as exc:
        return ImageInFlight(job, clock, unreadable=exc)


def open_job(job: ImageJob, runner: Runner, options: AnalyzeOptions,
             holder: Optional[Record] = None) -> ImageInFlight:
    """The image's record, before any stage; done already when its outputs can be reused, or
    when its output name is refused. `holder`: the results log's latest record naming the
    image's output name, which vouches for what its unit holds."""
    flight = _read_once(job, StageClock(), options.max_file_bytes)
    made_by = provenance(sha256_bytes(flight.job.data) if flight.job.data is not None else None, runner)
    flight.result = JobResult(Record(str(job.path), backend=runner.backend, precision=runner.precision,
                                     provenance=made_by))
    if options.out_dir is None:
        return flight
    try:
        flight.paths = OutputPaths.below(options.out_dir, job.relative)
    except OutputNameError as exc:
        _failed(flight, exc)
        return flight
    _check_existing_unit(flight, options, holder)
    if flight.done:  # reused or refused: its bytes are not needed
        flight.job = replace(flight.job, data=None)
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
    record = flight.result.record
    record.status, record.reason, record.outputs = "error", _one_line(exc), {}
    flight.result.error, flight.done = exc, True
    flight.rgb = flight.prepared = flight.raw = None


def decode_job(flight: ImageInFlight, runner: Runner, options: AnalyzeOptions) -> None:
    _contained(flight, _decode, runner, options.max_pixels, options.decode_seconds)


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


def _recompute_in_fp32(flight: ImageInFlight, guard) -> None:
    """The verdict guard's FP32 analysis in place of the reduced precision's, near the threshold;
    the record keeps the reduced score beside it, the outputs' provenance names the FP32 model."""
    record, reduced = flight.result.record, flight.analysis
    with flight.clock.stage("verdict_guard"):
        raw, runner = guard.infer_fp32(prepare_input(flight.rgb))
        flight.analysis = postprocess(raw, runner.detection_head)
    record.verdict_guard = {"reduced_precision": record.precision, "reduced_score": reduced.score,
                            "margin": guard.margin}
    record.precision = runner.precision
    record.provenance = provenance(record.provenance["input_sha256"], runner)


def _postprocess_and_write(flight: ImageInFlight, detection_head, options: AnalyzeOptions, guard) -> None:
    _postprocess(flight, detection_head)
    if guard is not None and guard.near_threshold(flight.analysis.score):
        _recompute_in_fp32(flight, guard)
    record = flight.result.record
    if flight.paths is not None:
        with flight.clock.stage("write"):
            record.outputs = write_unit(flight.paths, flight.rgb, flight.analysis, record.provenance,
                                        options.save_noiseprint, options.write_png)
    record.height, record.width = flight.rgb.shape[:2]
    record.score = flight.analysis.score
    flight.result.analysis = flight.analysis


def finish_job(flight: ImageInFlight, detection_head, options: AnalyzeOptions, guard=None) -> JobResult:
    """Postprocess (and, near the threshold, the verdict `guard`'s FP32 analysis) and write
    (when there is an output folder); the record gets its times, their total being the image's
    own work (time spent waiting between stages is not its)."""
    _contained(flight, _postprocess_and_write, detection_head, options, guard)
    flight.rgb = None
    flight.result.record.analysed_at = utc_now()
    if flight.clock.times_ms:  # some stage ran
        times = dict(flight.clock.times_ms)
        times["total"] = round(sum(times.values()), 3)
        flight.result.record.times_ms = times
    return flight.result


def run_job(job: ImageJob, runner: Runner, options: AnalyzeOptions, holder: Optional[Record] = None,
            guard=None) -> JobResult:
    """One image through every stage in this thread; never raises for a bad image (the record
    says what happened), only RunnerFailure when the runner itself broke. `holder`: as open_job;
    `guard`: the runner's verdict guard, if any (verdict_guard.verdict_guard_for)."""
    return complete_job(open_job(job, runner, options, holder), runner, options, guard)


def complete_job(flight: ImageInFlight, runner: Runner, options: AnalyzeOptions, guard=None) -> JobResult:
    """The stages after open_job, in this thread (a done flight only gets its record finished)."""
    decode_job(flight, runner, options)
    return infer_and_finish(flight, runner, options, guard)


def infer_and_finish(flight: ImageInFlight, runner: Runner, options: AnalyzeOptions, guard=None) -> JobResult:
    """The stages after decode_job, in this thread (`serve` decodes on other threads than its
    runner's, so that one slow decode never holds the others' inference)."""
    infer_job(flight, runner)
    return finish_job(flight, runner.detection_head, options, guard)
