"""The ways in that keep one runner warm: `watch` (a folder) and `serve` (HTTP). Both hand each
image to the same per-image job as `analyze` (batch.analyze.run_job)."""
