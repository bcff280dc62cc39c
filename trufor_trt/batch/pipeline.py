"""Images through the per-image job's stages, overlapped: opening jobs (one thread) -> decode +
prepare (the host workers) -> inference (one thread per runner) -> postprocess + write (the host
workers), joined by bounded queues and windows, so the CPU stages overlap inference and only a
few images wait in memory whatever the input holds. `analyze`, `watch`'s rounds, the Ray actors
and `bench`'s Offline and host-only modes all run it.

The host workers are one pool of threads shared by both CPU stages: decoding (OpenCV, Pillow),
the postprocessor (numpy, OpenCV), PNG and zip writing (zlib), hashing and file writes all
release the GIL, so threads scale over cores (docs/benchmarks.md, "Host side"). Each image's outputs are
computed by the same functions whichever worker takes it: the bytes do not depend on the count.

Records come out in the order images leave inference (with one runner: the input order), each
once finished. Setting the `halt` event (Ctrl-C) stops taking images: those inferred already
are still written, the rest get no record, so a resumed run does them; nothing is half-written
either way. With `batch` > 1, consecutive decoded images of one size go to the runner together,
up to what it takes for that size (runner.batch_limit); an image of another size closes the
group: nothing is padded.
"""

import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from trufor_trt.engine.runner import Runner
from trufor_trt.engine.runner_spec import host_workers
from trufor_trt.engine.timing import StageClock
from trufor_trt.batch.analyze import AnalyzeOptions, ImageInFlight, JobResult, decode_job, finish_job, infer_jobs, open_job
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.records import Record, RecordIndex, utc_now
from trufor_trt.batch.results_log import ResultsLog

POLL_S = 0.1
END = "end of stream"  # what each producer puts last on a queue (None: nothing came in a poll)
QUEUE_DEPTH_PER_RUNNER = 2
BUSY_STAGES = {"host": ("decode", "preprocess", "postprocess", "write"), "inference": ("inference",)}


class Pipeline:
    """One run over a stream of jobs. A failure of the pipeline itself (not of an image: those
    are records), or of a runner (RunnerFailure), stops every thread and is raised again by run().
    `halt`: an event that, once set, stops the run cleanly (see above); `batch`: the most
    same-size images inferred together; `host_workers`: the threads of the CPU stages
    (runner_spec.host_workers gives the machine's default); `guard`: the runners' verdict guard,
    if any (verdict_guard.verdict_guard_for)."""

    def __init__(self, runners: list, options: AnalyzeOptions, halt: Optional[threading.Event] = None,
                 batch: int = 1, host_workers: int = 2, guard=None):
        self.runners, self.options, self.batch, self.guard = runners, options, batch, guard
        self.host_workers = max(1, host_workers)
        depth = QUEUE_DEPTH_PER_RUNNER * len(runners)
        self._window = self.host_workers + depth  # images in each CPU stage at once, at most
        self._opened, self._inferred = queue.Queue(maxsize=depth), queue.Queue(maxsize=depth)
        self._stop = threading.Event()  # a failure: every thread returns at once
        self._halt = halt or threading.Event()
        self._errors = []
        self._pool: Optional[ThreadPoolExecutor] = None
        self.busy_ms = {stage: 0.0 for stage in BUSY_STAGES}

    def _put(self, channel: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                return channel.put(item, timeout=POLL_S)
            except queue.Full:
                continue

    def _get(self, channel: queue.Queue, once: bool = False):
        """The next item (END once the stream ends); None if the run stops (`once`: or if nothing
        comes within one poll)."""
        while not self._stop.is_set():
            try:
                return channel.get(timeout=POLL_S)
            except queue.Empty:
                if once:
                    return None
        return None

    def _guarded(self, work: Callable, *args) -> None:
        try:
            work(*args)
        except BaseException as exc:  # raised again by run() once every thread has stopped
            self._errors.append(exc)
            self._stop.set()

    def _decoded_in_order(self, flights: Iterable):
        """The flights, decoded by the host workers, in input order (batches of consecutive
        images must be the same whatever the worker count); at most a window ahead."""
        runner = self.runners[0]  # any runner: they share the model, so its size limits
        pending = deque()  # (flight, its decoding)

        def oldest() -> ImageInFlight:
            flight, decoding = pending.popleft()
            decoding.result()  # a failure of the pipeline itself is raised here
            return flight

        for flight in flights:
            if self._stop.is_set() or self._halt.is_set():
                break
            pending.append((flight, self._pool.submit(decode_job, flight, runner, self.options)))
            if len(pending) >= self._window:
                yield oldest()
        while pending and not self._stop.is_set() and not self._halt.is_set():
            yield oldest()

    def _produce(self, flights: Iterable) -> None:
        """Decoded images, in groups for the inference threads (of one each, unless batching)."""
        runner = self.runners[0]  # any runner: they share the model, so its batch limits
        group = []
        for flight in self._decoded_in_order(flights):
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
        if group and not self._halt.is_set() and not self._stop.is_set():
            self._put(self._opened, group)
        for _ in self.runners:
            self._put(self._opened, END)

    def _infer(self, runner: Runner) -> None:
        while (group := self._get(self._opened)) is not None and group is not END:
            if self._halt.is_set():
                continue  # not inferred: no record, a resumed run does them
            infer_jobs(group, runner)
            for flight in group:
                self._put(self._inferred, flight)
        self._put(self._inferred, END)

    def _account(self, flight: ImageInFlight) -> None:
        times = flight.clock.times_ms
        for stage, parts in BUSY_STAGES.items():
            self.busy_ms[stage] += sum(times.get(part, 0.0) for part in parts)

    def run(self, flights: Iterable, on_result: Callable[[JobResult], None]) -> float:
        """Every flight (from open_job, or finished already) through the stages; on_result gets
        each in the calling thread. Returns the wall-clock ms."""
        start = time.perf_counter_ns()
        with ThreadPoolExecutor(self.host_workers, thread_name_prefix="trufor-host") as self._pool:
            workers = [threading.Thread(target=self._guarded, args=(self._produce, flights), daemon=True)]
            workers += [threading.Thread(target=self._guarded, args=(self._infer, runner), daemon=True)
                        for runner in self.runners]
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

    def _finish(self, flight: ImageInFlight) -> JobResult:
        result = finish_job(flight, self.runners[0].detection_head, self.options, self.guard)
        self._account(flight)
        return result

    def _write_what_was_inferred(self, pending: deque, on_result) -> None:
        """After a failure elsewhere (a runner that broke): the images inferred before it are
        finished and recorded, as they would have been; nothing more is taken."""
        while True:
            try:
                flight = self._inferred.get_nowait()
            except queue.Empty:
                break
            if flight is not END:
                pending.append(self._pool.submit(self._finish, flight))
        while pending:
            on_result(pending.popleft().result())

    def _drain(self, on_result) -> None:
        """Inferred images to the host workers; their records to on_result, in inference order,
        each as soon as it and those before it are written."""
        ended, pending = 0, deque()
        while ended < len(self.runners) or pending:
            if pending and (pending[0].done() or len(pending) >= self._window or ended == len(self.runners)):
                on_result(pending.popleft().result())
                continue
            flight = self._get(self._inferred, once=bool(pending))
            if flight is END:
                ended += 1
            elif flight is not None:
                pending.append(self._pool.submit(self._finish, flight))
            if self._stop.is_set():  # another stage failed: what was inferred is still written
                self._write_what_was_inferred(pending, on_result)
                return


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
                  halt: Optional[threading.Event] = None, batch: int = 1, workers: int = 0, guard=None) -> Counter:
    """Every job through the pipeline, one line each appended to results.jsonl as it finishes,
    then results.csv rewritten. `workers`: the CPU stages' threads (0: runner_spec.host_workers);
    `guard`: as Pipeline's. Returns how many records had each status (ok, error, skipped);
    fewer than the jobs when `halt` was set. RunnerFailure passes through, the log closed;
    OutputFolderBusy when another run holds the output folder, ResultsLogError when the log
    cannot be written."""
    with ResultsLog(options.out_dir) as log:
        def keep(result: JobResult) -> None:
            log.add(result.record)
            if on_record is not None:
                on_record(result.record)

        pipeline = Pipeline(runners, options, halt, batch, workers or host_workers(runners), guard)
        pipeline.run(open_jobs(jobs, runners[0], options, log.index), keep)
    return log.summary
