"""Checkpoint -> verified ONNX model folders (and, later, precision variants and engines). Needs torch."""
