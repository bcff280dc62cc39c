"""Per-stage wall-clock timing for the CPU side of a pipeline."""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageClock:
    """Milliseconds per named stage, measured with perf_counter_ns."""

    times_ms: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.times_ms[name] = round((time.perf_counter_ns() - start) / 1e6, 3)
