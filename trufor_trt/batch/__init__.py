"""Batch analysis: inputs to outputs, one image at a time, each failure contained."""
