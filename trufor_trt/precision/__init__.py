"""Precision as one concern, shared by the stages that need it: the network's blocks and the
chains that decide precision (`blocks`), FP16 lowering of an ONNX graph and its CPU simulation
of float16 storage (`fp16`). Export (the FP16 plan), calibration (INT8) and the ONNX Runtime
runner (measuring FP16 / INT8 variants) import it; it imports none of them. Needs `onnx`."""
