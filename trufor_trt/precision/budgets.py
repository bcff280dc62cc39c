"""How far each reduced precision may move the published outputs from FP32 (max abs), the one
definition the plans (export/), calibration and the engines' validation at build all hold to."""

# The FP16 variant: 5x the core floors for the maps and the score (far from moving a decision
# at 0.5), 2.5x it for Noiseprint++ (1e-2 against a signal of standard deviation about 0.15 and
# range about +-1.6 on the goldens; at 1x its floor no plan of 70% of the FLOPs in FP16 holds
# under cuDNN's rounding of a convolution's output, issue 40).
FP16_BUDGET = {"map": 5e-3, "conf": 2.5e-3, "score": 1.5e-3, "np++": 1e-2}
# What INT8 must keep to be usable as evidence (and no decision flipped).
INT8_TARGET = {"map": 5e-2, "score": 2e-2}
BUDGETS = {"fp16": FP16_BUDGET, "int8": INT8_TARGET}
