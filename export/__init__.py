"""Checkpoint -> verified ONNX model folders, precision variants, TensorRT engines.

Export and the variants need torch / onnx (the `export` extra); building an engine from a
model folder (tensorrt_build) needs only TensorRT and pycuda, as on a Jetson.
"""
