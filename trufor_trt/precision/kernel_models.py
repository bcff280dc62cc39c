"""How a float16 convolution may round, as the CPU simulation models it (precision/fp16.py).
No heavy imports: the runners name a model without loading the ONNX tools.

Kernels do not all compute a float16 convolution alike, and a plan must hold under each:
- "rounded_output": float32 accumulation, the product rounded to float16 before anything is
  added, the bias included (PyTorch's cuDNN path writes the float16 convolution, then adds the
  bias); what the graph's types say, and more;
- "fused": float32 accumulation with the bias added to the accumulator, and where the graph
  casts the output straight back to float32, no float16 output at all (a conv + bias +
  elementwise epilogue: TensorRT's fusions).
STRESS_MODEL is promised by no kernel we know of, and measured, not required: float16
accumulation (NVIDIA/TensorRT#1237), the partial sums rounded every ACCUMULATION_CHANNELS input
channels and every running total rounded, then as "rounded_output".
"""

KERNEL_MODELS = ("rounded_output", "fused")
STRESS_MODEL = "fp16_accumulation"
ACCUMULATION_CHANNELS = 16
# What a runner simulating a reduced-precision variant uses unless told: the order that adds
# the most rounding of the two a plan is held to.
SIMULATED_KERNEL_MODEL = "rounded_output"
