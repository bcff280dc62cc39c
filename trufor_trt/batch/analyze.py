"""The per-image job behind every way in (`analyze`, `watch`, `serve`) and analyze's batch loop.

Per image: decode -> prepare -> infer (any runner) -> postprocess -> write, each stage timed;
one JSON line per image in `results.jsonl`. A bad image gets a one-line reason and the batch
goes on; existing outputs are skipped unless overwrite is asked for, so a batch can resume.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..engine.decode import DEFAULT_MAX_PIXELS, decode_bytes, decode_image
from ..engine.postprocess import Analysis, postprocess
from ..engine.preprocess import prepare_input
from ..engine.runner import Runner
from ..engine.timing import StageClock
from ..errors import TruforError, one_line
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


def analyse_file(path, runner: Runner, clock: StageClock, max_pixels: int = DEFAULT_MAX_PIXELS,
                 data: Optional[bytes] = None):
    """decode -> prepare -> infer -> postprocess, each stage timed; returns (rgb, Analysis).
    `data`: the image's bytes when it is not read from `path` (an upload)."""
    with clock.stage("decode"):
        if data is None:
            rgb = decode_image(path, max_pixels=max_pixels, admit=runner.refusal)
        else:
            rgb = decode_bytes(data, path, max_pixels=max_pixels, admit=runner.refusal)
    with clock.stage("preprocess"):
        prepared = prepare_input(rgb)
    with clock.stage("inference"):
        raw = runner.infer(prepared)
    with clock.stage("postprocess"):
        analysis = postprocess(raw, runner.detection_head)
    return rgb, analysis


def _write_outputs(paths: OutputPaths, rgb, analysis: Analysis, options: AnalyzeOptions,
                   made_by: dict) -> None:
    write_atomically(paths.npz, npz_bytes(analysis, options.save_noiseprint, made_by))
    if options.write_png:
        write_atomically(paths.heatmap, heatmap_png(analysis.localization_map))
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


def run_job(job: ImageJob, runner: Runner, options: AnalyzeOptions) -> JobResult:
    """Analyse one image and write its outputs (when there is an output folder); never raises
    for a bad image: the record says what happened. Existing outputs are reused only when their
    provenance matches this run's."""
    paths = OutputPaths.below(options.out_dir, job.relative) if options.out_dir is not None else None
    expected = paths.expected(options.write_png) if paths is not None else []
    made_by = provenance(input_sha256(job.path, job.data), runner)
    record = {"input": str(job.path), "outputs": [str(path) for path in expected],
              "status": "ok", "reason": None, "score": None, "height": None, "width": None,
              "backend": runner.backend, "precision": runner.precision, "times_ms": {},
              "provenance": made_by}
    result = JobResult(record)
    if paths is not None and not options.overwrite:
        reused, record["reason"] = _reusable(expected, made_by)
        if reused is not None:
            record.update(reused)
            return result
    clock = StageClock()
    try:
        with clock.stage("total"):
            rgb, result.analysis = analyse_file(job.path, runner, clock, options.max_pixels, job.data)
            if paths is not None:
                with clock.stage("write"):
                    _write_outputs(paths, rgb, result.analysis, options, made_by)
        height, width = rgb.shape[:2]
        record.update(score=result.analysis.score, height=height, width=width)
    except Exception as exc:  # one bad image must not stop the batch
        record.update(status="error", reason=_one_line(exc), outputs=[])
        result.analysis, result.error = None, exc
    record["times_ms"] = clock.times_ms
    return result


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
        self._file = open(self.out_dir / RESULTS_FILE, "a", encoding="utf-8")
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


def _name_taken(job: ImageJob, owner: Path, runner: Runner) -> dict:
    return {"input": str(job.path), "outputs": [], "status": "error",
            "reason": f"output name {job.relative!r} already used by {owner}",
            "backend": runner.backend, "precision": runner.precision}


def analyze_batch(jobs, runner: Runner, options: AnalyzeOptions, on_record=None) -> Counter:
    """Every job through the runner, one line each appended to results.jsonl, then results.csv
    rewritten. Returns how many records had each status (ok, error, skipped)."""
    claimed = {}
    with ResultsLog(options.out_dir) as log:
        for job in jobs:
            owner = claimed.setdefault(job.relative, job.path)
            record = (run_job(job, runner, options).record if owner == job.path
                      else _name_taken(job, owner, runner))
            log.add(record)
            if on_record is not None:
                on_record(record)
    return log.summary
