"""One benchmark case, run in a process of its own (see bench.py for why): load the runner,
time images one at a time (SingleStream), then through `analyze`'s pipeline with several
runners (Offline, nothing written), and report the process's memory."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trufor_trt.batch.analyze import AnalyzeOptions, analyse_file
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.pipeline import Pipeline, open_jobs
from trufor_trt.engine.runner_spec import (MachineShare, RunnerSpec, close_all, host_workers, make_runner,
                                           share_among)
from trufor_trt.engine.timing import StageClock

from trufor_trt.benchmarks.memory import peak_rss_bytes, rss_bytes

CPU_BACKENDS = ("onnxruntime", "torch")
DEVICE_STAGES = ("host_to_device", "inference", "device_postprocess", "device_to_host")


@dataclass(frozen=True)
class CaseSpec:
    backend: str
    precision: str
    images: tuple  # image files, used in turn
    warmup: int
    repeat: int
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    device: str = "auto"
    streams: int = 0  # runners side by side in the Offline run; 0: no Offline run
    official: bool = False  # the torch reference, computed the official way


def case_runner(spec: CaseSpec, threads: int = 0):
    """The case's runner, not yet loaded: the spec's, or the official-formulation torch reference."""
    if spec.official:
        from trufor_trt.engine.torch_runner import TorchRunner

        return TorchRunner(spec.checkpoint, device=spec.device, precision=spec.precision,
                           threads=threads, official=True)
    runner_spec = RunnerSpec(spec.backend, spec.precision, model=spec.model, checkpoint=spec.checkpoint,
                             device=spec.device)
    return make_runner(runner_spec, MachineShare(threads))


def _elapsed_ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6


def time_one_image(runner, path) -> tuple:
    """(ms per stage, end-to-end ms, image shape) for one image, run exactly as `analyze` runs
    it; end to end is its own clock. GPU runners' device stages replace the infer() call."""
    clock = StageClock()
    begin = time.perf_counter_ns()
    rgb, _ = analyse_file(path, runner, clock)
    total_ms = _elapsed_ms(begin)
    stages = dict(clock.times_ms)
    device_stages = {name: runner.last_stage_ms[name] for name in DEVICE_STAGES
                     if name in runner.last_stage_ms}
    if device_stages:
        del stages["inference"]
        stages.update(device_stages)
    return stages, total_ms, rgb.shape[:2]


def single_stream(runner, spec: CaseSpec) -> dict:
    """Batch 1, one image after the other; the warm-up iterations are not recorded. Runners
    that run the network in parts also give each part's times (`parts_samples_ms`)."""
    samples, parts = {"end_to_end": []}, {}
    shapes = []
    for index in range(spec.warmup + spec.repeat):
        stages, total_ms, shape = time_one_image(runner, spec.images[index % len(spec.images)])
        if index < spec.warmup:
            continue
        for name, ms in stages.items():
            samples.setdefault(name, []).append(ms)
        for name, ms in runner.last_parts_ms.items():
            parts.setdefault(name, []).append(ms)
        samples["end_to_end"].append(total_ms)
        shapes.append(shape)
    return {"samples_ms": samples, "parts_samples_ms": parts, "shapes": shapes}


def _raise_failure(result) -> None:
    if result.error is not None:  # a benchmark's images are all good: a failure is the runner's
        raise result.error


def offline(spec: CaseSpec) -> dict:
    """Throughput of `streams` runners in `analyze`'s pipeline, its host workers as analyze
    sizes them, nothing written. CPU runners share the cores instead of each taking all of them."""
    threads = share_among(spec.streams, None).threads if spec.backend in CPU_BACKENDS else 0
    runners = [case_runner(spec, threads) for _ in range(spec.streams)]
    try:
        for runner in runners:
            runner.load()
            time_one_image(runner, spec.images[0])  # warm-up, not timed
        count = max(spec.repeat, 2 * spec.streams)
        jobs = [ImageJob(Path(spec.images[index % len(spec.images)]), str(index)) for index in range(count)]
        options = AnalyzeOptions(out_dir=None)
        pipeline = Pipeline(runners, options, host_workers=host_workers(runners))
        wall_ms = pipeline.run(open_jobs(jobs, runners[0], options), _raise_failure)
        device = [runner.device_memory_bytes() for runner in runners]
    finally:
        close_all(runners)
    return {"streams": spec.streams, "threads_per_runner": threads, "images": count,
            "wall_ms": wall_ms, "busy_ms": pipeline.busy_ms,
            "workers": {"host": pipeline.host_workers, "inference": spec.streams},
            "device_peak_bytes": sum(device) if all(value is not None for value in device) else None,
            "host_peak_rss_bytes": peak_rss_bytes()}


def run_case(spec: CaseSpec) -> dict:
    """The whole case; meant to be the only work of a fresh process."""
    runner = case_runner(spec)
    start = time.perf_counter_ns()
    runner.load()
    result = {"backend": runner.backend, "precision": runner.precision, "load_ms": _elapsed_ms(start),
              "host_rss_after_load_bytes": rss_bytes()}
    try:
        result["single_stream"] = single_stream(runner, spec)
        result["memory"] = {"host_peak_rss_bytes": peak_rss_bytes(),
                            "device_peak_bytes": runner.device_memory_bytes()}
    finally:
        runner.close()
    if spec.streams:
        result["offline"] = offline(spec)
    return result


def measure_gemm_rates() -> dict:
    from trufor_trt.benchmarks.machine import gemm_rates

    return gemm_rates()
