"""Images through the per-image job's stages on overlapping threads: decode + prepare (one
thread) -> inference (one thread per runner) -> postprocess + write (the calling thread), joined
by bounded queues, so the CPU stages overlap inference and only a few prepared images wait in
memory whatever the input holds. `analyze` and `bench`'s Offline mode both run it.

Records come out in the order images finish: with one runner that is the input order.
Setting the `halt` event (Ctrl-C) stops taking images: those inferred already are still
written, the rest get no record, so a resumed run does them; nothing is half-written either
way. With `batch` > 1, consecutive decoded images of one size go to the runner together, up to
what it takes for that size (runner.batch_limit); an image of another size closes the group:
nothing is padded.
"""

import queue
import threading
import time
from collections import Counter
from typing import Callable, Iterable, Optional

from trufor_trt.engine.runner import Runner
from trufor_trt.engine.timing import StageClock
from trufor_trt.batch.analyze import AnalyzeOptions, ImageInFlight, JobResult, decode_job, finish_job, infer_jobs, open_job
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.records import Record, RecordIndex, utc_now
from trufor_trt.batch.results_log import ResultsLog

POLL_S = 0.1
QUEUE_DEPTH_PER_RUNNER = 2
BUSY_STAGES = {"decode+preprocess": ("decode", "preprocess"), "inference": ("inference",),
               "postprocess": ("postprocess", "write")}


class Pipeline:
    """One run over a stream of jobs. A failure of the pipeline itself (not of an image: those
    are records), or of a runner (RunnerFailure), stops every thread and is raised again by run().
    `halt`: an event that, once set, stops the run cleanly (see above); `batch`: the most
    same-size images inferred together."""

    def __init__(self, runners: list, options: AnalyzeOptions, halt: Optional[threading.Event] = None,
                 batch: int = 1):
        self.runners, self.options, self.batch = runners, options, batch
        depth = QUEUE_DEPTH_PER_RUNNER * len(runners)
        self._opened, self._inferred = queue.Queue(maxsize=depth), queue.Queue(maxsize=depth)
        self._stop = threading.Event()  # a failure: every thread returns at once
        self._halt = halt or threading.Event()
        self._errors = []
        self.busy_ms = {stage: 0.0 for stage in BUSY_STAGES}

    def _put(self, channel: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                return channel.put(item, timeout=POLL_S)
            except queue.Full:
                continue

    def _get(self, channel: queue.Queue):
        """The next item; None once the stream ends or the run stops."""
        while not self._stop.is_set():
            try:
                return channel.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def _guarded(self, work: Callable, *args) -> None:
        try:
            work(*args)
        except BaseException as exc:  # raised again by run() once every thread has stopped
            self._errors.append(exc)
            self._stop.set()

    def _produce(self, flights: Iterable) -> None:
        """Decoded images, in groups for the inference threads (of one each, unless batching)."""
        runner = self.runners[0]  # any runner: they share the model, so its size and batch limits
        group = []
        for flight in flights:
            if self._stop.is_set():
                return
            if self._halt.is_set():
                break
            decode_job(flight, runner, self.options)
            if flight.done:  # nothing to infer: it passes any group waiting to fill
                self._put(self._opened, [flight])
                continue
            if group and group[0].prepared.shape != flight.prepared.shape:
                self._put(self._opened, group)
                group = []
            group.append(flight)
            if len(group) >= min(self.batch, runner.batch_limit(*flight.prepared.shape[2:])):
                self._put(self._opened, group)
                group = []
        if group and not self._halt.is_set():
            self._put(self._opened, group)
        for _ in self.runners:
            self._put(self._opened, None)

    def _infer(self, runner: Runner) -> None:
        while (group := self._get(self._opened)) is not None:
            if self._halt.is_set():
                continue  # not inferred: no record, a resumed run does them
            infer_jobs(group, runner)
            for flight in group:
                self._put(self._inferred, flight)
        self._put(self._inferred, None)

    def _account(self, flight: ImageInFlight) -> None:
        times = flight.clock.times_ms
        for stage, parts in BUSY_STAGES.items():
            self.busy_ms[stage] += sum(times.get(part, 0.0) for part in parts)

    def run(self, flights: Iterable, on_result: Callable[[JobResult], None]) -> float:
        """Every flight (from open_job, or finished already) through the stages; on_result gets
        each in the calling thread. Returns the wall-clock ms."""
        workers = [threading.Thread(target=self._guarded, args=(self._produce, flights), daemon=True)]
        workers += [threading.Thread(target=self._guarded, args=(self._infer, runner), daemon=True)
                    for runner in self.runners]
        start = time.perf_counter_ns()
        for worker in workers:
            worker.start()
        try:
            self._guarded(self._drain, on_result)
        finally:
            self._stop.set()
            for worker in workers:
                worker.join()
        if self._errors:
            raise self._errors[0]
        return (time.perf_counter_ns() - start) / 1e6

    def _drain(self, on_result) -> None:
        finished = 0
        while finished < len(self.runners):
            flight = self._get(self._inferred)
            if flight is None:
                if self._stop.is_set():
                    return
                finished += 1
                continue
            result = finish_job(flight, self.runners[0].detection_head, self.options)
            self._account(flight)
            on_result(result)


def claim_output_names(jobs: Iterable):
    """(job, None) for each job, or (job, the earlier input that took its output name)."""
    claimed = {}
    for job in jobs:
        owner = claimed.setdefault(job.relative, job.path)
        yield job, None if owner == job.path else owner


def name_taken_record(job: ImageJob, owner, backend: str, precision: str) -> Record:
    return Record(str(job.path), status="error", reason=f"output name {job.relative!r} already used by {owner}",
                  backend=backend, precision=precision, analysed_at=utc_now())


def open_jobs(jobs: Iterable, runner: Runner, options: AnalyzeOptions, index: Optional[RecordIndex] = None):
    """The flights for `jobs`, opened lazily (the reuse check reads files) as the pipeline asks;
    a job whose output name another input took already is refused here. `index`: the output
    folder's records, which say whose evidence each existing output name holds."""
    for job, owner in claim_output_names(jobs):
        if owner is None:
            yield open_job(job, runner, options, index.holder(job.relative) if index is not None else None)
        else:
            record = name_taken_record(job, owner, runner.backend, runner.precision)
            yield ImageInFlight(job, StageClock(), JobResult(record), done=True)


def analyze_batch(jobs, runners: list, options: AnalyzeOptions, on_record=None,
                  halt: Optional[threading.Event] = None, batch: int = 1) -> Counter:
    """Every job through the pipeline, one line each appended to results.jsonl as it finishes,
    then results.csv rewritten. Returns how many records had each status (ok, error, skipped);
    fewer than the jobs when `halt` was set. RunnerFailure passes through, the log closed;
    OutputFolderBusy when another run holds the output folder, ResultsLogError when the log
    cannot be written."""
    with ResultsLog(options.out_dir) as log:
        def keep(result: JobResult) -> None:
            log.add(result.record)
            if on_record is not None:
                on_record(result.record)

        Pipeline(runners, options, halt, batch).run(open_jobs(jobs, runners[0], options, log.index), keep)
    return log.summary
