"""One benchmark case, run in a process of its own (see bench.py for why): load the runner,
time images one at a time (SingleStream), then through a pipeline of several runners
(Offline), and report the process's memory."""

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

from trufor_trt.batch.analyze import analyse_file
from trufor_trt.engine import create_runner
from trufor_trt.engine.decode import decode_image
from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.timing import StageClock

from .memory import peak_rss_bytes, rss_bytes

CPU_BACKENDS = ("onnxruntime", "torch")
DEVICE_STAGES = ("host_to_device", "inference", "device_to_host")


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


def make_runner(spec: CaseSpec, threads: int = 0):
    if spec.official:
        from trufor_trt.engine.torch_runner import TorchRunner

        return TorchRunner(spec.checkpoint, device=spec.device, precision=spec.precision,
                           threads=threads, official=True)
    return create_runner(spec.backend, checkpoint=spec.checkpoint, model=spec.model,
                         device=spec.device, precision=spec.precision, threads=threads)


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
    """Batch 1, one image after the other; the warm-up iterations are not recorded."""
    samples = {"end_to_end": []}
    shapes = []
    for index in range(spec.warmup + spec.repeat):
        stages, total_ms, shape = time_one_image(runner, spec.images[index % len(spec.images)])
        if index < spec.warmup:
            continue
        for name, ms in stages.items():
            samples.setdefault(name, []).append(ms)
        samples["end_to_end"].append(total_ms)
        shapes.append(shape)
    return {"samples_ms": samples, "shapes": shapes}


class _Pipeline:
    """decode + preprocess (one thread) -> inference (one thread per runner) -> postprocess
    (one thread), joined by bounded queues so that the CPU stages overlap inference and no
    more than a few prepared images wait in memory. A failure anywhere stops every thread."""

    POLL_S = 0.1

    def __init__(self, runners, images, count: int):
        self.runners, self.images, self.count = runners, images, count
        self.prepared = queue.Queue(maxsize=2 * len(runners))
        self.inferred = queue.Queue(maxsize=2 * len(runners))
        self.busy_ms = {"decode+preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
        self.lock = threading.Lock()
        self.failed = threading.Event()
        self.errors = []

    def _add_busy(self, stage: str, start_ns: int) -> None:
        with self.lock:
            self.busy_ms[stage] += _elapsed_ms(start_ns)

    def _put(self, channel: queue.Queue, item) -> None:
        while not self.failed.is_set():
            try:
                return channel.put(item, timeout=self.POLL_S)
            except queue.Full:
                continue

    def _get(self, channel: queue.Queue):
        """The next item; None once the stream ends or something failed."""
        while not self.failed.is_set():
            try:
                return channel.get(timeout=self.POLL_S)
            except queue.Empty:
                continue
        return None

    def _guarded(self, work, *args) -> None:
        try:
            work(*args)
        except Exception as exc:  # raised again by run() once every thread has stopped
            self.errors.append(exc)
            self.failed.set()

    def _produce(self) -> None:
        for index in range(self.count):
            start = time.perf_counter_ns()
            prepared = prepare_input(decode_image(self.images[index % len(self.images)]))
            self._add_busy("decode+preprocess", start)
            self._put(self.prepared, prepared)
        for _ in self.runners:
            self._put(self.prepared, None)

    def _infer(self, runner) -> None:
        while (prepared := self._get(self.prepared)) is not None:
            start = time.perf_counter_ns()
            raw = runner.infer(prepared)
            self._add_busy("inference", start)
            self._put(self.inferred, (raw, runner.detection_head))
        self._put(self.inferred, None)

    def _postprocess(self) -> None:
        finished = 0
        while finished < len(self.runners) and not self.failed.is_set():
            item = self._get(self.inferred)
            if item is None:
                finished += 1
                continue
            start = time.perf_counter_ns()
            postprocess(*item)
            self._add_busy("postprocess", start)

    def run(self) -> float:
        """Wall-clock ms from the first decode to the last postprocess."""
        workers = [threading.Thread(target=self._guarded, args=(self._produce,))]
        workers += [threading.Thread(target=self._guarded, args=(self._infer, runner))
                    for runner in self.runners]
        start = time.perf_counter_ns()
        for worker in workers:
            worker.start()
        self._guarded(self._postprocess)
        wall_ms = _elapsed_ms(start)
        for worker in workers:
            worker.join()
        if self.errors:
            raise self.errors[0]
        return wall_ms


def offline(spec: CaseSpec) -> dict:
    """Throughput of `streams` runners fed by one decoding thread, drained by one postprocessing
    thread. CPU runners share the cores between them instead of each taking all of them."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // spec.streams) if spec.backend in CPU_BACKENDS else 0
    runners = [make_runner(spec, threads) for _ in range(spec.streams)]
    try:
        for runner in runners:
            runner.load()
            time_one_image(runner, spec.images[0])  # warm-up, not timed
        count = max(spec.repeat, 2 * spec.streams)
        pipeline = _Pipeline(runners, spec.images, count)
        wall_ms = pipeline.run()
        device = [runner.device_memory_bytes() for runner in runners]
    finally:
        for runner in runners:
            runner.close()
    return {"streams": spec.streams, "threads_per_runner": threads, "images": count,
            "wall_ms": wall_ms, "busy_ms": pipeline.busy_ms,
            "workers": {"decode+preprocess": 1, "inference": spec.streams, "postprocess": 1},
            "device_peak_bytes": sum(device) if all(value is not None for value in device) else None,
            "host_peak_rss_bytes": peak_rss_bytes()}


def run_case(spec: CaseSpec) -> dict:
    """The whole case; meant to be the only work of a fresh process."""
    runner = make_runner(spec)
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
    from .machine import gemm_rates

    return gemm_rates()
