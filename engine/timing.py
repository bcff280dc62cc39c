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

    def add(self, name: str, milliseconds: float) -> None:
        """A stage timed elsewhere (one image's share of a batch)."""
        self.times_ms[name] = round(self.times_ms.get(name, 0.0) + milliseconds, 3)
