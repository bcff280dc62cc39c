"""Summary statistics of timing samples (milliseconds)."""

import numpy as np

PERCENTILES = {"median": 50, "p90": 90, "p99": 99}


def summarize(samples_ms) -> dict:
    """n, min, mean, median, p90, p99, max of the samples. Percentiles interpolate linearly
    between the two nearest ranks (numpy's default), so p99 of few samples lies near the max."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no samples to summarize")
    summary = {"n": int(samples.size), "min": float(samples.min()), "mean": float(samples.mean())}
    summary.update({name: float(np.percentile(samples, q)) for name, q in PERCENTILES.items()})
    summary["max"] = float(samples.max())
    return summary


def busiest(busy_ms: dict, wall_ms: float, workers: dict) -> tuple:
    """The pipeline stage that was busy for the largest share of the wall time its workers
    had: (stage, utilisation per stage). A stage near 1.0 is the bottleneck."""
    utilisation = {stage: busy / (wall_ms * workers[stage]) for stage, busy in busy_ms.items()}
    return max(utilisation, key=utilisation.get), utilisation
