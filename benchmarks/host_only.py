"""`trufor-trt bench --host-only`: what the host side sustains, without the network.

The network runs once per size (the model given, or the seeded random weights on PyTorch's
CPU: the maps' look, which PNG sizes depend on, is the network's); its raw outputs are kept,
and a replay runner hands them back at once for every image of that size. Every case then runs
`analyze`'s pipeline (decode, prepare, postprocess, write the unit) in a fresh process on as
many cores as it has workers, over copies of a synthetic photograph: images/s per size, with
and without the PNGs, for 1..N workers, and each stage's milliseconds per megapixel. This is
the rate a data-center user compares with the GPU's: the host must not be what limits.
"""

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trufor_trt import __version__
from trufor_trt.engine.runner import RawOutputs, Runner
from trufor_trt.errors import TruforError

from trufor_trt.benchmarks.machine import machine_info

HOST_STAGES = ("decode", "preprocess", "postprocess", "write")
IMAGES_PER_WORKER = 20
MEMORY_FOLDER = Path("/dev/shm")  # outputs written to memory: the disk's speed is not the host's CPU


def scratch_root() -> Optional[str]:
    """Where the cases write: memory where the system has it (else the default temporary folder)."""
    return str(MEMORY_FOLDER) if MEMORY_FOLDER.is_dir() and os.access(MEMORY_FOLDER, os.W_OK) else None


class ReplayRunner(Runner):
    """Returns the raw outputs stored for each image size at once: a GPU runner infinitely fast."""

    backend = "replay"
    precision = "stored"

    def __init__(self, stored: dict, detection_head, model_sha256: Optional[str] = None):
        super().__init__()
        self.stored = stored  # (height, width) -> RawOutputs
        self._head, self._model_sha256 = detection_head, model_sha256

    def load(self) -> None:
        self.detection_head, self.model_sha256 = self._head, self._model_sha256

    def refusal(self, height: int, width: int):
        return None if (height, width) in self.stored else f"no stored outputs for {height}x{width}"

    def infer(self, prepared) -> RawOutputs:
        return self.stored[tuple(prepared.shape[2:])]

    def on_gpu(self) -> bool:
        return True  # it takes no host core: the host side has them all


@dataclass(frozen=True)
class HostCase:
    image: str  # the synthetic photograph, copied `images` times
    raw: RawOutputs
    detection_head: object
    workers: int
    pngs: bool
    images: int


def _pin_to_cores(count: int) -> int:
    """This process on `count` of its cores, where the system lets it; how many it then has."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[:count])
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _copies(image: str, folder: Path, count: int) -> list:
    from trufor_trt.batch.inputs import ImageJob

    folder.mkdir()
    jobs = []
    for index in range(count):
        path = folder / f"{index:04d}{Path(image).suffix}"
        shutil.copy(image, path)
        jobs.append(ImageJob(path, path.name))
    return jobs


def run_host_case(case: HostCase) -> dict:
    """One case's pipeline, meant to be the only work of a fresh process."""
    from trufor_trt.batch.analyze import AnalyzeOptions
    from trufor_trt.batch.pipeline import Pipeline, open_jobs

    cores = _pin_to_cores(case.workers)
    height, width = case.raw.noiseprint.shape
    runner = ReplayRunner({(height, width): case.raw}, case.detection_head)
    runner.load()
    with tempfile.TemporaryDirectory(prefix="trufor-host-", dir=scratch_root()) as scratch:
        jobs = _copies(case.image, Path(scratch) / "in", case.images + 1)
        options = AnalyzeOptions(out_dir=Path(scratch) / "out", write_png=case.pngs)
        Pipeline([runner], options, host_workers=1).run(open_jobs(jobs[:1], runner, options), _checked)
        times, pipeline = [], Pipeline([runner], options, host_workers=case.workers)
        wall_ms = pipeline.run(open_jobs(jobs[1:], runner, options),
                               lambda result: times.append(_checked(result).record.times_ms))
    megapixels = height * width / 1e6
    per_megapixel = {stage: sum(image.get(stage, 0.0) for image in times) / len(times) / megapixels
                     for stage in HOST_STAGES}
    return {"input": f"{height}x{width}", "megapixels": megapixels, "pngs": case.pngs,
            "written_below": scratch_root() or tempfile.gettempdir(),
            "workers": case.workers, "cores": cores, "images": len(times), "wall_ms": wall_ms,
            "images_per_s": len(times) / (wall_ms / 1e3), "ms_per_megapixel": per_megapixel,
            "host_ms_per_megapixel": sum(per_megapixel.values())}


def _checked(result):
    if result.record.status != "ok":
        raise RuntimeError(f"{result.record.input}: {result.record.reason}")
    return result


def capture_outputs(runner: Runner, images: dict) -> dict:
    """(height, width) -> the runner's raw outputs for that size's image (decoded as analyze does)."""
    from trufor_trt.engine.decode import decode_image
    from trufor_trt.engine.preprocess import prepare_input

    return {size: runner.infer(prepare_input(decode_image(path))) for size, path in images.items()}


def _speedups(runs: list) -> None:
    """Each run's images/s over the one-worker run of its size and PNG setting."""
    single = {(run["input"], run["pngs"]): run["images_per_s"] for run in runs if run["workers"] == 1}
    for run in runs:
        base = single.get((run["input"], run["pngs"]))
        run["speedup_vs_one_worker"] = run["images_per_s"] / base if base else None


def run_host_only(images: dict, runner: Runner, max_workers: int, in_process, on_step=print) -> dict:
    """`images`: (height, width) -> a synthetic photograph's path; `runner`: loaded, the network
    whose outputs are replayed; `in_process(function, case)` runs a case in a fresh process."""
    on_step("running the network once per size, for the outputs to replay")
    stored = capture_outputs(runner, images)
    runs = []
    for size, path in images.items():
        for pngs in (False, True):
            for workers in range(1, max_workers + 1):
                on_step(f"{size[0]}x{size[1]}, {'with' if pngs else 'without'} PNGs, {workers} worker(s)")
                case = HostCase(str(path), stored[size], runner.detection_head, workers, pngs,
                                IMAGES_PER_WORKER * workers)
                runs.append(in_process(run_host_case, case))
    _speedups(runs)
    return {"tool": "trufor-trt bench --host-only", "host_only": True, "version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "runs": runs}


def worker_counts(requested: int) -> int:
    """Up to `requested` workers (0: every core this process may use); no more than the cores."""
    from trufor_trt.engine.runner_spec import usable_cores

    cores = usable_cores()
    if requested > cores:
        raise TruforError(f"--workers {requested}: this process may use {cores} cores")
    return requested or cores


def rows(report: dict):
    """(size, PNGs, workers, images/s, speed-up, ms/MP per host stage..., host ms/MP)."""
    for run in report["runs"]:
        speedup = run["speedup_vs_one_worker"]
        yield (run["input"], "yes" if run["pngs"] else "no", str(run["workers"]), f"{run['images_per_s']:.1f}",
               f"{speedup:.2f}x" if speedup else "-",
               *(f"{run['ms_per_megapixel'][stage]:.1f}" for stage in HOST_STAGES),
               f"{run['host_ms_per_megapixel']:.1f}")


HEADER = ("input", "PNGs", "workers", "images/s", "vs 1 worker", *(f"{stage}, ms/MP" for stage in HOST_STAGES),
          "host, ms/MP")


def markdown_table(report: dict) -> str:
    machine = report["machine"]
    lines = [f"Measured {report['date'][:10]} on {machine['cpu']} ({machine['physical_cores']} cores), "
             f"`trufor-trt bench --host-only`, {IMAGES_PER_WORKER} images per worker per row, outputs "
             f"written below {report['runs'][0]['written_below']}; stage times are each image's own "
             "(with N workers they share the cores' caches).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    return "\n".join(lines) + "\n"


def print_table(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title="Host side, the network replayed: images/s and each stage's ms per megapixel")
    for column in HEADER:
        table.add_column(column, justify="left" if column in ("input", "PNGs") else "right")
    for row in rows(report):
        table.add_row(*row)
    console.print(table)
