"""`analyze --ray`: the per-image job on a Ray cluster, through Ray Data.

This process (the driver) lists the inputs, refuses clashing output names, and keeps the one
results.jsonl (and hands each image the log's record of its output name, which vouches for
what the name holds). The remaining inputs become a dataset whose rows `map_batches` hands to a pool of
actors; each actor holds one loaded runner on its node and runs the pipeline `analyze` runs
(batch/pipeline.py) over the images it is given, writing their outputs into the output folder
itself (a file system every node shares), exactly as `analyze` does, and returning their records.

Ray restarts an actor whose process dies and retries the images it had (Ray Data's defaults).
Outputs are only ever renamed into place whole, so a retried image either finds its outputs
complete and matching (skipped) or is analysed again; each image gets one line in this run.
"""

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from trufor_trt.batch.analyze import AnalyzeOptions, open_job
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.pipeline import Pipeline, claim_output_names, name_taken_record
from trufor_trt.batch.records import Record
from trufor_trt.batch.results_log import ResultsLog
from trufor_trt.batch.verdict_guard import verdict_guard_for
from trufor_trt.engine.runner_spec import MachineShare, RunnerSpec, host_workers, make_runner, share_of_cores
from trufor_trt.errors import RunnerFailure, TruforError
from trufor_trt.files import remove_stale_temporaries

LOCAL = "local"  # --ray local: start a Ray instance for this run on this machine
IMAGES_PER_TASK = {"cpu": 1, "gpu": 4}  # a GPU actor's pipeline overlaps a few images


@dataclass(frozen=True)
class ActorSpec:
    """What an actor needs to load its runner on its own node (paths on the shared file system):
    a resolved runner spec whose model and checkpoint are path strings."""

    runner: RunnerSpec
    cpus: int = 1  # cores per actor: CPU backends' inference threads, GPU backends' host workers
    folder: str = "."  # the driver's working folder: relative paths mean the same on every node
    batch: int = 1  # the most same-size images inferred together (runners that take batches)
    verdict_margin: Optional[float] = None  # verdict_guard.verdict_guard_for's

    @property
    def on_gpu(self) -> bool:
        runner = self.runner
        return runner.backend == "tensorrt" or (runner.backend == "torch" and runner.device.startswith("cuda"))


class AnalyzeImages:
    """The Ray Data actor: one runner, loaded once, for every batch of images it is handed."""

    def __init__(self, spec: ActorSpec, options: AnalyzeOptions):
        os.chdir(spec.folder)  # this process is the actor's alone
        self.options, self.batch, self.cpus = options, spec.batch, spec.cpus
        share = MachineShare() if spec.on_gpu else share_of_cores(spec.cpus, spec.runner.max_memory)
        self.runner = make_runner(spec.runner, share)
        self.runner.load()
        self.guard = verdict_guard_for(spec.runner, spec.verdict_margin)

    def __call__(self, batch: dict) -> dict:
        """Rows (path, relative, holder) -> their records as JSON lines; if the runner broke, a
        last row with the reason instead (an exception would reach the driver only as text)."""
        flights = (open_job(_job(path, relative), self.runner, self.options,
                            Record.from_json(json.loads(holder)) if holder else None)
                   for path, relative, holder in zip(batch["path"], batch["relative"], batch["holder"]))
        records, failures = [], []
        try:
            Pipeline([self.runner], self.options, batch=self.batch,
                     host_workers=host_workers([self.runner], self.cpus), guard=self.guard).run(
                flights, lambda result: records.append(json.dumps(result.record.to_json())))
        except RunnerFailure as exc:
            failures.append(str(exc))
        return {"record": records + [""] * len(failures), "runner_failure": [""] * len(records) + failures}


def _job(path, relative) -> ImageJob:
    return ImageJob(Path(str(path)), str(relative))  # numpy strings from the batch


def _connect(address: str):
    import ray.data  # binds `ray` too

    for name in ("ray", "ray.data"):  # Ray's notes on its own set-up are not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address == LOCAL:
        ray.init(**settings)
    else:
        ray.init(address=address, **settings)  # "auto": the cluster this machine belongs to
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    return ray


def _pool(ray, spec: ActorSpec, workers: int) -> tuple:
    """(actors, resources per actor), checked against what the cluster has."""
    resources = ray.cluster_resources()
    if spec.on_gpu:
        available, needs = int(resources.get("GPU", 0)), {"num_gpus": 1, "num_cpus": spec.cpus}
        if available == 0:
            raise TruforError(f"the {spec.runner.backend} backend needs GPUs, and the Ray cluster has none")
    else:
        available, needs = int(resources.get("CPU", 0)) // spec.cpus, {"num_cpus": spec.cpus}
        if available == 0:
            raise TruforError(f"no Ray node has {spec.cpus} CPUs for one worker (--ray-cpus)")
    return workers or available, needs


def analyze_on_ray(jobs, address: str, spec: ActorSpec, options: AnalyzeOptions, workers: int = 0,
                   on_record: Callable[[Record], None] = lambda record: None, halt=None,
                   on_start: Callable[[int, dict], None] = lambda workers, needs: None) -> Counter:
    """Every job analysed by actors on the cluster at `address` (LOCAL: a Ray instance started for
    this run); one line per image in results.jsonl as records come back. Returns records per
    status (fewer than the jobs when `halt` was set). RunnerFailure: an actor's runner broke."""
    ray = _connect(address)
    try:
        if spec.runner.backend == "torch" and spec.runner.device == "auto":
            device = "cuda" if ray.cluster_resources().get("GPU") else "cpu"
            spec = replace(spec, runner=replace(spec.runner, device=device))
        with ResultsLog(options.out_dir) as log:
            def keep(record: Record) -> None:
                log.add(record)
                on_record(record)

            rows = []
            for job, owner in claim_output_names(jobs):
                if owner is None:
                    holder = log.index.holder(job.relative)
                    rows.append({"path": str(job.path), "relative": job.relative,
                                 "holder": json.dumps(holder.to_json()) if holder else ""})
                else:
                    keep(name_taken_record(job, owner, spec.runner.backend, spec.runner.precision))
            if rows and _run_dataset(ray, rows, spec, options, workers, keep, halt, on_start):
                # Every actor is done: what temporaries remain were left by actors that died
                # mid-write (on any node: their process ids mean nothing here).
                remove_stale_temporaries(options.out_dir, every_other_writer=True)
        return log.summary
    finally:
        ray.shutdown()


def _run_dataset(ray, rows: list, spec: ActorSpec, options: AnalyzeOptions, workers: int,
                 keep: Callable[[Record], None], halt, on_start) -> bool:
    """Whether every row came back (False: halted)."""
    actors, needs = _pool(ray, spec, workers)
    on_start(actors, needs)
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        AnalyzeImages, fn_constructor_args=(spec, options),
        batch_size=IMAGES_PER_TASK["gpu" if spec.on_gpu else "cpu"],
        compute=ray.data.ActorPoolStrategy(size=actors), **needs)
    for row in dataset.iter_rows():
        if row["runner_failure"]:
            raise RunnerFailure(row["runner_failure"])  # the actors stop with the Ray instance
        keep(Record.from_json(json.loads(row["record"])))
        if halt is not None and halt.is_set():
            return False  # the actors stop with the Ray instance; a resumed run does the rest
    return True
