"""Which blocks of the network may run in FP16: earned per block, measured, not assumed.

For each block (Noiseprint++, each stream's stage, each fusion stage, each decoder, the input
normalisation):
1. its activations' largest magnitude on the calibration images must stay below
   FP16_RANGE_LIMIT (float16 overflows at 65504; the margin covers unseen images);
2. alone in FP16 (simulated on the CPU, see precision/fp16.py) it may move the published outputs by
   at most BLOCK_SHARE of the FP16 budget.
Sums over all pixels (the fusion's cross-attention context) always stay FP32: their range
grows with the image size, which no calibration crop shows.
The accepted blocks together must then stay within the budget, re-measured; the worst block
is given back to FP32 until they do. LayerNormalization and Softmax always stay FP32.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..precision.blocks import block_of, pixel_sum_chains
from ..precision.fp16 import lower_to_fp16, tensor_types, upcast_fp16
from .measure import OUTPUTS, create_session_from_model, deviation, reference_analyses

ALWAYS_FP32 = frozenset({"LayerNormalization", "Softmax", "Cast", "Constant"})
FP16_RANGE_LIMIT = 2.0 ** 14
# Deviation allowed for the FP16 variant against FP32, max abs on the published outputs:
# 5x the core floors for the maps and the score (far from moving a decision at 0.5), and
# the core floor itself for Noiseprint++, the network's evidence.
FP16_BUDGET = {"map": 5e-3, "conf": 2.5e-3, "score": 1.5e-3, "np++": 4e-3}
BLOCK_SHARE = 0.5


def candidate_blocks(model: onnx.ModelProto) -> dict:
    """block name -> names of its nodes that may be lowered. Besides the sensitive operators,
    the sums over all pixels stay FP32: their range grows with the image, so no calibration
    set bounds it (at 1536x2048 the fusion context overflows float16)."""
    size_dependent = {name for chain in pixel_sum_chains(model) for name in chain}
    blocks = {}
    for node in model.graph.node:
        if node.op_type not in ALWAYS_FP32 and node.name not in size_dependent:
            blocks.setdefault(block_of(node.name), set()).add(node.name)
    return blocks


def activation_ranges(model: onnx.ModelProto, inputs: list, blocks: dict) -> dict:
    """block -> the largest |activation| its nodes wrote on the calibration inputs."""
    float_type = onnx.TensorProto.FLOAT
    types = tensor_types(model)
    owner = {output: block_of(node.name) for node in model.graph.node for output in node.output
             if node.name in blocks.get(block_of(node.name), ()) and types.get(output) == float_type}
    probed = onnx.ModelProto.FromString(model.SerializeToString())
    known = {output.name for output in probed.graph.output}
    probed.graph.output.extend(onnx.helper.make_tensor_value_info(name, float_type, None)
                               for name in owner if name not in known)
    session = create_session_from_model(probed)
    names = [output.name for output in session.get_outputs()]
    ranges = {block: 0.0 for block in blocks}
    for prepared in inputs:
        for name, value in zip(names, session.run(names, {"image": prepared})):
            if name in owner:
                ranges[owner[name]] = max(ranges[owner[name]], float(np.max(np.abs(value))))
    return ranges


def budget_share(errors: dict) -> float:
    return max(errors[name] / FP16_BUDGET[name] for name in OUTPUTS)


@dataclass
class Fp16Plan:
    half_nodes: set = field(default_factory=set)
    blocks: dict = field(default_factory=dict)  # block -> {range, solo deviation, decision}
    deviation: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"budget_max_abs": FP16_BUDGET, "block_share": BLOCK_SHARE,
                "range_limit": FP16_RANGE_LIMIT, "blocks": self.blocks,
                "deviation_vs_fp32": self.deviation}


def plan_fp16(model: onnx.ModelProto, inputs: list, head, on_step=print) -> Fp16Plan:
    reference = reference_analyses(model, inputs, head)
    blocks = candidate_blocks(model)
    on_step(f"measuring activation ranges of {len(blocks)} blocks")
    ranges = activation_ranges(model, inputs, blocks)
    plan = Fp16Plan()
    solo = {}
    for block, nodes in sorted(blocks.items()):
        entry = plan.blocks[block] = {"max_abs_activation": ranges[block]}
        if ranges[block] > FP16_RANGE_LIMIT:
            entry["decision"] = "fp32: activations beyond the float16-safe range"
            continue
        on_step(f"trying {block} in FP16")
        errors = deviation(upcast_fp16(lower_to_fp16(model, nodes)), reference, inputs, head)
        entry["solo_deviation"] = errors
        if budget_share(errors) > BLOCK_SHARE:
            entry["decision"] = f"fp32: alone it uses {budget_share(errors):.0%} of the FP16 budget"
        else:
            solo[block] = budget_share(errors)
            entry["decision"] = "fp16"
    while solo:
        half_nodes = set().union(*(blocks[block] for block in solo))
        on_step(f"measuring {len(solo)} FP16 blocks together")
        plan.deviation = deviation(upcast_fp16(lower_to_fp16(model, half_nodes)), reference, inputs, head)
        if budget_share(plan.deviation) <= 1.0:
            plan.half_nodes = half_nodes
            break
        worst = max(solo, key=solo.get)
        plan.blocks[worst]["decision"] = "fp32: given back, the FP16 blocks together exceeded the budget"
        del solo[worst]
    return plan
