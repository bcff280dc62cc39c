"""INT8 calibration: the real images it reads, and explicit Q/DQ quantization of the graph."""
