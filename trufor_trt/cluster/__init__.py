"""The job spread over many machines: `analyze --ray` (Ray Data). Imports ray only when run."""
