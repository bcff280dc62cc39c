"""How runners are opened: which backend, how many side by side, and each one's share of the
machine (host cores and memory). The one policy that `analyze`, `watch`, `serve`, `bench` and
the Ray actors follow.
"""

import os
from dataclasses import dataclass, replace

from trufor_trt.engine import create_runner, pick_backend
from trufor_trt.engine.memory_budget import physical_memory


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner is made from; `backend` may be "auto" until `resolved`."""

    backend: str
    precision: str = "fp32"
    model: object = None  # the model folder (ONNX Runtime, TensorRT): a path or an opened ModelDir
    checkpoint: object = None  # the torch backend's checkpoint
    device: str = "auto"  # torch: cpu, cuda or auto
    max_memory: int | None = None  # host budget per image, for all runners together; None: physical
    accept_unvalidated: bool = False  # TensorRT: run FP16 / INT8 engines not validated within budget

    def resolved(self, on_notice=None) -> "RunnerSpec":
        """The spec with "auto" replaced by the backend that runs here (engine.pick_backend)."""
        if self.backend == "torch":
            return self
        # the opened folder where there is one: its files were checked when it was opened
        return replace(self, backend=pick_backend(self.backend, self.model, self.precision, on_notice=on_notice,
                                                  accept_unvalidated=self.accept_unvalidated))


@dataclass(frozen=True)
class MachineShare:
    """One runner's share of the host: CPU threads (0: the backend's default, every core) and
    the host memory budget per image (None: physical memory)."""

    threads: int = 0
    max_memory_bytes: int | None = None


def share_among(count: int, budget: int | None) -> MachineShare:
    """Each of `count` runners side by side in one process: an equal share of the cores and of
    the budget (default: physical memory). One runner keeps every core and the budget as given."""
    if count <= 1:
        return MachineShare(0, budget)
    budget = budget or physical_memory()
    return MachineShare(max(1, (os.cpu_count() or 1) // count), budget // count if budget else None)


def share_of_cores(cpus: int, budget: int | None) -> MachineShare:
    """A runner given `cpus` of its node's cores (a Ray actor): that many threads, and as large a
    share of the node's memory as of its cores, unless `budget` says otherwise."""
    cores = os.cpu_count() or 1
    memory = physical_memory()
    return MachineShare(cpus, budget or (memory * min(cpus, cores) // cores if memory else None))


CPU_RUNNER_HOST_WORKERS = 2  # decoding and finishing beside CPU inference, which has the cores


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, or every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_workers(runners: list, cores: int = 0) -> int:
    """Threads for the CPU stages (decode, prepare, postprocess, write) of a pipeline: beside GPU
    runners every core (`cores`, else the process's), so that the host keeps up with the
    device; beside CPU runners two, which overlap inference without taking its cores."""
    if runners and all(runner.on_gpu() for runner in runners):
        return cores or usable_cores()
    return CPU_RUNNER_HOST_WORKERS


def make_runner(spec: RunnerSpec, share: MachineShare = MachineShare()):
    """One runner of a resolved spec, not yet loaded. TensorRT's budget is the device memory one
    engine or chain may take: --max-memory as given, not a share of the host's memory."""
    budget = spec.max_memory if spec.backend == "tensorrt" else share.max_memory_bytes
    return create_runner(spec.backend, checkpoint=spec.checkpoint,
                         model=None if spec.backend == "torch" else spec.model, device=spec.device,
                         precision=spec.precision, threads=share.threads, max_memory_bytes=budget,
                         accept_unvalidated=spec.accept_unvalidated)


def open_runners(spec: RunnerSpec, count: int = 0) -> list:
    """`count` loaded runners of a resolved spec, side by side in this process (0: the backend's
    default_streams), sharing the host (share_among). If one fails to load, those loaded are
    closed and the error goes on."""
    count = count or make_runner(spec).default_streams
    share = share_among(count, spec.max_memory)
    runners = []
    try:
        for _ in range(count):
            runners.append(make_runner(spec, share))
            runners[-1].load()
    except BaseException:
        close_all(runners)
        raise
    return runners


def close_all(runners: list) -> None:
    for runner in runners:
        runner.close()
