"""`/metrics`: the service's counters and latency histograms in the Prometheus text format."""

from typing import Callable

from trufor_trt import __version__

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """One registry per app (not the process-wide default), so several apps can coexist."""

    def __init__(self, runner, queue_length: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.images = Counter("trufor_images", "Images answered, by outcome (analysed or failed)",
                              ["outcome"], registry=self.registry)
        self.rejected = Counter("trufor_requests_rejected", "Requests refused before analysis, by reason",
                                ["reason"], registry=self.registry)
        self.stage_seconds = Histogram("trufor_stage_seconds", "Time per stage of the per-image job",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("trufor_request_seconds",
                                         "From a request's arrival to its answer, queueing included",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("trufor_queue_length", "Requests waiting for the runner",
              registry=self.registry).set_function(queue_length)
        Info("trufor_engine", "What answers: backend, precision, model", registry=self.registry).info(
            {"backend": runner.backend, "precision": runner.precision,
             "model_sha256": runner.model_sha256 or "", "trufor_trt": __version__})
        for outcome in ("analysed", "failed"):
            self.images.labels(outcome)  # present from the start, at 0
        self._job_seconds, self._jobs = 0.0, 0

    def observe(self, record) -> None:
        """One image's record (batch.records.Record): its outcome and stage times."""
        self.images.labels("failed" if record.status == "error" else "analysed").inc()
        for stage, milliseconds in record.times_ms.items():
            self.stage_seconds.labels(stage).observe(milliseconds / 1000)
        self._job_seconds += record.times_ms.get("total", 0) / 1000
        self._jobs += 1

    def mean_job_seconds(self) -> float:
        """Mean time of one image so far (1 s before the first): what a Retry-After is made of."""
        return self._job_seconds / self._jobs if self._jobs else 1.0

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
