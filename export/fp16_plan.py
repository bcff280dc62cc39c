"""Which parts of the network compute in FP16: earned per unit, measured, not assumed.

Units: each of Noiseprint++'s 17 convolutions alone (75% of the network's FLOPs at 512 px, and
its most rounding-sensitive part), and elsewhere one unit per block (each stream's stage, each
fusion stage, each decoder, the input normalisation). A unit earns FP16 when
1. its activations' largest magnitude on the calibration images stays below FP16_RANGE_LIMIT
   (float16 overflows at 65504; the margin covers unseen images);
2. alone in FP16 (simulated on the CPU, see precision/fp16.py) it moves the published outputs
   by at most UNIT_SHARE of the FP16 budget. A Noiseprint++ convolution is tried in both forms
   of precision/conv16.py, plain and compensated, and keeps the one that moves less (plain
   when within PLAIN_PREFERENCE of it: it executes a third of the products);
3. the earned units together stay within PLAN_MARGIN of the budget on the calibration crops and
   within the budget on every full-size image of the every-size check: while they do not, the
   unit that costs the most budget per FLOP it brings is given back to FP32.
Sums over all pixels (the fusion's cross-attention context) always stay FP32: their range
grows with the image size. LayerNormalization and Softmax always stay FP32.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..engine.preprocess import size_label
from ..engine.runner import INPUT_NAME, OUTPUT_NAMES
from ..precision.blocks import block_of, pixel_sum_chains
from ..precision.conv16 import lower_convolutions
from ..precision.flops import node_flops
from ..precision.fp16 import lower_to_fp16, tensor_types, upcast_fp16
from .measure import OUTPUTS, create_session_from_model, deviation, reference_analyses, worst_by_output

ALWAYS_FP32 = frozenset({"LayerNormalization", "Softmax", "Cast", "Constant"})
FP16_RANGE_LIMIT = 2.0 ** 14
# Deviation allowed for the FP16 variant against FP32, max abs on the published outputs:
# 5x the core floors for the maps and the score (far from moving a decision at 0.5), and
# the core floor itself for Noiseprint++, the network's evidence.
FP16_BUDGET = {"map": 5e-3, "conf": 2.5e-3, "score": 1.5e-3, "np++": 4e-3}
UNIT_SHARE = 0.5
PLAN_MARGIN = 0.8  # of the budget on the crops: full-size images deviate more (more pixels)
PLAIN_PREFERENCE = 1.5
NOISEPRINT = "noiseprint++"
NOISEPRINT_OUTPUT = OUTPUT_NAMES[2]  # the graph output Noiseprint++'s last convolution writes
FLOP_SIZE = (512, 512)  # the size unit FLOPs are weighed at


@dataclass(frozen=True)
class Unit:
    name: str
    nodes: frozenset  # lowered by lower_to_fp16
    conv: str = ""  # a Noiseprint++ convolution, lowered by lower_convolutions


@dataclass
class Fp16Plan:
    half_nodes: set = field(default_factory=set)  # every node computing in float16
    conv_forms: dict = field(default_factory=dict)  # Noiseprint++ conv -> "fp16" | "compensated"
    units: dict = field(default_factory=dict)  # unit -> {range, solo deviation, form, decision}
    deviation_by_size: dict = field(default_factory=dict)  # "HxW" (or "crops") -> deviation
    sizes_measured: list = field(default_factory=list)

    def report(self) -> dict:
        return {"budget_max_abs": FP16_BUDGET, "unit_share": UNIT_SHARE, "plan_margin": PLAN_MARGIN,
                "range_limit": FP16_RANGE_LIMIT, "units": self.units,
                "noiseprint_conv_forms": self.conv_forms, "deviation_vs_fp32": worst_by_output(self.deviation_by_size),
                "deviation_by_size": self.deviation_by_size, "sizes_measured": self.sizes_measured}


def candidate_units(model: onnx.ModelProto) -> list:
    """Every unit that may be lowered. Besides the sensitive operators, the sums over all
    pixels stay FP32: their range grows with the image, so no calibration set bounds it (at
    1536x2048 the fusion context overflows float16)."""
    size_dependent = {name for chain in pixel_sum_chains(model) for name in chain}
    blocks, units = {}, []
    for node in model.graph.node:
        if node.op_type in ALWAYS_FP32 or node.name in size_dependent:
            continue
        block = block_of(node.name)
        if block != NOISEPRINT:
            blocks.setdefault(block, set()).add(node.name)
        elif node.op_type == "Conv":
            units.append(Unit(f"{NOISEPRINT} layer {len(units) + 1}", frozenset(), node.name))
    return units + [Unit(block, frozenset(nodes)) for block, nodes in sorted(blocks.items())]


def lower_plan(model: onnx.ModelProto, half_nodes: set, conv_forms: dict) -> tuple:
    """(the graph with the plan's nodes in float16, names of all its float16 nodes)."""
    lowered, conv_half = lower_convolutions(model, conv_forms) if conv_forms else (model, set())
    # Each pass copies the graph: skipped where it has nothing to lower (a trial of one unit).
    lowered = lower_to_fp16(lowered, half_nodes) if half_nodes else lowered
    return lowered, set(half_nodes) | conv_half


def recorded_plan(model: onnx.ModelProto, report: dict) -> dict:
    """A manifest's FP16 plan as the nodes it lowers: {"units", "half_nodes", "conv_forms"}."""
    earned = [unit for unit in candidate_units(model)
              if report["units"].get(unit.name, {}).get("decision") == "fp16" and not unit.conv]
    return {"units": report["units"], "half_nodes": set().union(*(unit.nodes for unit in earned)),
            "conv_forms": dict(report["noiseprint_conv_forms"])}


def _unit_outputs(model: onnx.ModelProto, units: list) -> dict:
    """float tensor -> the unit whose node writes it."""
    types = tensor_types(model)
    owner = {name: unit for unit in units for name in (unit.nodes or {unit.conv})}
    return {output: owner[node.name].name for node in model.graph.node if node.name in owner
            for output in node.output if types.get(output) == onnx.TensorProto.FLOAT}


def activation_ranges(model: onnx.ModelProto, inputs: list, units: list) -> dict:
    """unit -> the largest |activation| its nodes wrote on the calibration inputs."""
    owner = _unit_outputs(model, units)
    probed = onnx.ModelProto.FromString(model.SerializeToString())
    known = {output.name for output in probed.graph.output}
    probed.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                               for name in owner if name not in known)
    session = create_session_from_model(probed)
    names = [output.name for output in session.get_outputs()]
    ranges = {unit.name: 0.0 for unit in units}
    for prepared in inputs:
        for name, value in zip(names, session.run(names, {"image": prepared})):
            if name in owner:
                ranges[owner[name]] = max(ranges[owner[name]], float(np.max(np.abs(value))))
    return ranges


def budget_share(errors: dict) -> float:
    """The largest fraction of its budget any measured output uses (a flipped decision: inf)."""
    if errors.get("flipped"):
        return float("inf")
    return max(errors[name] / FP16_BUDGET[name] for name in OUTPUTS if name in errors)


class Measure:
    """Deviation of candidate graphs from FP32 on a fixed set of inputs (references kept)."""

    def __init__(self, model, inputs, head):
        self.model, self.inputs, self.head = model, inputs, head
        self.reference = reference_analyses(model, inputs, head)

    def graph(self, graph: onnx.ModelProto) -> dict:
        return deviation(upcast_fp16(graph), self.reference, self.inputs, self.head)

    def __call__(self, half_nodes: set, conv_forms: dict) -> dict:
        return self.graph(lower_plan(self.model, half_nodes, conv_forms)[0])


class NoiseprintMeasure:
    """Deviation of Noiseprint++ alone (its graph cut out of the network) with some of its
    convolutions lowered: what a layer moves first is Noiseprint++ itself, and this trial costs
    a fraction of a whole-network one (the joint trials then measure every output)."""

    def __init__(self, model, inputs):
        from onnx.utils import Extractor

        self.graph = Extractor(model).extract_model([INPUT_NAME], [NOISEPRINT_OUTPUT])
        self.inputs = inputs
        self.reference = self._run(self.graph)

    def _run(self, graph):
        session = create_session_from_model(graph)
        return [session.run(None, {INPUT_NAME: prepared})[0] for prepared in self.inputs]

    def __call__(self, half_nodes: set, conv_forms: dict) -> dict:
        lowered = upcast_fp16(lower_convolutions(self.graph, conv_forms)[0])
        worst = max(float(np.max(np.abs(ours - truth))) for ours, truth in zip(self._run(lowered), self.reference))
        return {"np++": worst if np.isfinite(worst) else float("inf")}


def _solo(unit: Unit, measure: Measure, entry: dict, on_step) -> str:
    """The unit's best form alone ("" if none earns FP16), its deviation noted in `entry`."""
    forms = ("fp16", "compensated") if unit.conv else ("fp16",)
    shares = {}
    for form in forms:
        on_step(f"trying {unit.name} in FP16" + (f" ({form})" if unit.conv else ""))
        errors = measure(set(unit.nodes), {unit.conv: form} if unit.conv else {})
        entry.setdefault("solo_deviation", {})[form] = errors
        shares[form] = budget_share(errors)
    best = min(shares, key=shares.get)
    if shares.get("fp16", np.inf) <= PLAIN_PREFERENCE * shares[best]:
        best = "fp16"
    if shares[best] > UNIT_SHARE:
        entry["decision"] = f"fp32: alone it uses {shares[best]:.0%} of the FP16 budget"
        return ""
    entry["decision"] = "fp16"
    entry["form"] = best
    entry["budget_share"] = round(shares[best], 4)
    return best


def _assemble(units: dict) -> tuple:
    """(half nodes, conv forms) of the earned units: name -> (Unit, form)."""
    half = set().union(*(unit.nodes for unit, _ in units.values())) if units else set()
    return half, {unit.conv: form for unit, form in units.values() if unit.conv}


def grows_with_the_image(unit_name: str) -> bool:
    """Units whose deviation grows with the image size: the attention of the streams and of the
    fusion (more tokens per softmax). Measured on the seed-0 checkpoint at 1536x2048: the
    encoder blocks in FP16 moved the map by 1.8e-2 (half the budget on 256 px crops), Noiseprint++'s
    FP16 layers by 4.5e-3."""
    return unit_name.startswith(("rgb stream", "noiseprint stream", "fusion"))


def give_back_until_within(earned: dict, cost: dict, share_of, limit: float, decisions: dict, reason: str,
                           on_step, full_size: bool = False) -> None:
    """Give back (noted in `decisions[name]["decision"]`) the earned units with the highest
    budget cost per FLOP until `share_of(earned)`, the share of the budget they use together,
    is at most `limit`. `earned`: unit name -> what `share_of` needs. On a full-size image (a
    trial costs minutes) the units whose deviation grows with the image go first, as many at
    once as the excess suggests."""
    while earned:
        on_step(f"measuring {len(earned)} units together ({reason})")
        share = share_of(earned)
        if share <= limit:
            return
        growing = [name for name in earned if full_size and grows_with_the_image(name)]
        count = max(1, math.ceil(len(growing) * (1 - limit / share))) if growing else 1
        for name in sorted(earned, key=lambda name: (name not in growing, -cost[name]))[:count]:
            decisions[name]["decision"] = (f"given back: the units together used {share:.0%} of the budget "
                                           f"{reason}")
            del earned[name]


def plan_fp16(model: onnx.ModelProto, inputs: list, head, large_inputs=(), on_step=print) -> Fp16Plan:
    """The plan from calibration crops `inputs`, checked on `large_inputs` at full size."""
    measure, noiseprint_measure = Measure(model, inputs, head), NoiseprintMeasure(model, inputs)
    units = candidate_units(model)
    on_step(f"measuring activation ranges of {len(units)} units")
    ranges = activation_ranges(model, inputs, units)
    flops = node_flops(model, *FLOP_SIZE)
    plan, earned, cost = Fp16Plan(), {}, {}
    for unit in units:
        entry = plan.units[unit.name] = {"max_abs_activation": ranges[unit.name]}
        unit_flops = sum(flops.get(name, 0) for name in (unit.nodes or {unit.conv}))
        entry["gflop_at_512"] = round(unit_flops / 1e9, 3)
        if ranges[unit.name] > FP16_RANGE_LIMIT:
            entry["decision"] = "fp32: activations beyond the float16-safe range"
            continue
        form = _solo(unit, noiseprint_measure if unit.conv else measure, entry, on_step)
        if form:
            earned[unit.name] = (unit, form)
            cost[unit.name] = entry["budget_share"] / max(unit_flops, 1)

    def on_crops(units):
        plan.deviation_by_size["crops"] = measure(*_assemble(units))
        return budget_share(plan.deviation_by_size["crops"])

    give_back_until_within(earned, cost, on_crops, PLAN_MARGIN, plan.units, "on the calibration crops", on_step)
    plan.sizes_measured = sorted({size_label(x) for x in inputs})
    checked_on_crops = len(earned)
    # Largest first: a unit given back there is given back for the smaller ones too.
    for large in sorted(large_inputs, key=lambda x: -x.shape[2] * x.shape[3]):
        size = size_label(large)
        at_size = Measure(model, [large], head)

        def on_large(units, at_size=at_size, size=size):
            plan.deviation_by_size[size] = at_size(*_assemble(units))
            return budget_share(plan.deviation_by_size[size])

        give_back_until_within(earned, cost, on_large, 1.0, plan.units, f"at {size}", on_step, full_size=True)
        plan.sizes_measured.append(size)
    plan.half_nodes, plan.conv_forms = _assemble(earned)
    if len(earned) != checked_on_crops:
        plan.deviation_by_size["crops"] = measure(plan.half_nodes, plan.conv_forms)
    return plan
