"""The batch loop behind `trufor-trt analyze`: one image at a time, each failure contained.

Per image: decode -> prepare -> infer (any runner) -> postprocess -> write, each stage timed;
one JSON line per image in `results.jsonl`. A bad image gets a one-line reason and the batch
goes on; existing outputs are skipped unless overwrite is asked for, so a batch can resume.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..engine.decode import DEFAULT_MAX_PIXELS, decode_image
from ..engine.postprocess import postprocess
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
    out_dir: Path
    save_noiseprint: bool = False
    write_png: bool = True
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TruforError) and hasattr(exc, "reason"):
        return exc.reason
    return one_line(exc)


def analyse_file(path, runner: Runner, clock: StageClock, max_pixels: int = DEFAULT_MAX_PIXELS):
    """decode -> prepare -> infer -> postprocess, each stage timed; returns (rgb, Analysis)."""
    with clock.stage("decode"):
        rgb = decode_image(path, max_pixels=max_pixels, admit=runner.refusal)
    with clock.stage("preprocess"):
        prepared = prepare_input(rgb)
    with clock.stage("inference"):
        raw = runner.infer(prepared)
    with clock.stage("postprocess"):
        analysis = postprocess(raw, runner.detection_head)
    return rgb, analysis


def _run_image(job: ImageJob, runner: Runner, options: AnalyzeOptions, paths: OutputPaths,
               clock: StageClock, made_by: dict) -> dict:
    rgb, analysis = analyse_file(job.path, runner, clock, options.max_pixels)
    with clock.stage("write"):
        write_atomically(paths.npz, npz_bytes(analysis, options.save_noiseprint, made_by))
        if options.write_png:
            write_atomically(paths.heatmap, heatmap_png(analysis.localization_map))
            write_atomically(paths.overlay, overlay_png(rgb, analysis.localization_map))
    height, width = rgb.shape[:2]
    return {"score": analysis.score, "height": height, "width": width}


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


def analyze_job(job: ImageJob, runner: Runner, options: AnalyzeOptions) -> dict:
    """Analyse one image; never raises for a bad image: the record says what happened.
    Existing outputs are reused only when their provenance matches this run's."""
    paths = OutputPaths.below(options.out_dir, job.relative)
    expected = paths.expected(options.write_png)
    made_by = provenance(input_sha256(job.path), runner)
    record = {"input": str(job.path), "outputs": [str(path) for path in expected],
              "status": "ok", "reason": None, "score": None, "height": None, "width": None,
              "backend": runner.backend, "precision": runner.precision, "times_ms": {},
              "provenance": made_by}
    if not options.overwrite:
        reused, record["reason"] = _reusable(expected, made_by)
        if reused is not None:
            record.update(reused)
            return record
    clock = StageClock()
    try:
        with clock.stage("total"):
            record.update(_run_image(job, runner, options, paths, clock, made_by))
    except Exception as exc:  # one bad image must not stop the batch
        record.update(status="error", reason=_one_line(exc), outputs=[])
    record["times_ms"] = clock.times_ms
    return record


def analyze_batch(jobs, runner: Runner, options: AnalyzeOptions, on_record=None) -> Counter:
    """Every job through the runner, one line each appended to results.jsonl, then results.csv
    rewritten. Returns how many records had each status (ok, error, skipped)."""
    summary = Counter()
    claimed = {}
    options.out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(options.out_dir)
    try:
        with open(options.out_dir / RESULTS_FILE, "a", encoding="utf-8") as results:
            for job in jobs:
                owner = claimed.setdefault(job.relative, job.path)
                if owner != job.path:
                    record = {"input": str(job.path), "outputs": [], "status": "error",
                              "reason": f"output name {job.relative!r} already used by {owner}",
                              "backend": runner.backend, "precision": runner.precision}
                else:
                    record = analyze_job(job, runner, options)
                results.write(json.dumps(record) + "\n")
                results.flush()
                summary[record["status"]] += 1
                if on_record is not None:
                    on_record(record)
    finally:
        write_summary_csv(options.out_dir)
    return summary
