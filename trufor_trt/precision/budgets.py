"""How far each reduced precision may move the published outputs from FP32 (max abs), the one
definition the plans (export/), calibration and the engines' validation at build all hold to."""

# The FP16 variant: 5x the core floors for the maps and the score (far from moving a decision
# at 0.5), and the core floor itself for Noiseprint++, the network's evidence.
FP16_BUDGET = {"map": 5e-3, "conf": 2.5e-3, "score": 1.5e-3, "np++": 4e-3}
# What INT8 must keep to be usable as evidence (and no decision flipped).
INT8_TARGET = {"map": 5e-2, "score": 2e-2}
BUDGETS = {"fp16": FP16_BUDGET, "int8": INT8_TARGET}
