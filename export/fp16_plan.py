"""Which parts of the network compute in FP16: earned per unit, measured, not assumed.

Units: each of Noiseprint++'s 17 convolutions alone (75% of the network's FLOPs at 512 px, and
its most rounding-sensitive part), lowered in the centered form (precision/conv16.py); elsewhere
one unit per block (each stream's stage, each fusion stage, each decoder, the input
normalisation), a block's self-attention products a unit apart. A unit earns FP16 when
1. its activations' largest magnitude on the calibration images stays below FP16_RANGE_LIMIT
   (float16 overflows at 65504; the margin covers unseen images);
2. alone in FP16 (simulated on the CPU, see precision/fp16.py) it moves the published outputs
   by at most UNIT_SHARE of the FP16 budget under every kernel model (KERNEL_MODELS: a fused
   float32 epilogue, and the float16 output rounded before the bias as cuDNN does), and by at
   most MAX_COST_PER_FLOP_SHARE times its share of the network's FLOPs: a unit that brings
   almost no arithmetic spends budget that unseen images may need, for no speed;
3. the earned units together stay within PLAN_MARGIN of the budget on the calibration crops and
   within the budget on every full-size image of the every-size check, under every kernel
   model: while they do not, the unit that costs the most budget per FLOP it brings is given
   back to FP32. A full-size trial costs minutes, so each full-size image is first searched on
   its centre crop of half the height and width (a quarter of the pixels and of a trial's
   time) within PLAN_MARGIN; the full size then decides (within the budget), and gives back
   more only where the half-size search did not suffice.
Sums over all pixels (the fusion's cross-attention context) always stay FP32: their range
grows with the image size. LayerNormalization and Softmax always stay FP32. The finished plan
is also measured, not judged, under float16 accumulation (STRESS_MODEL).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from trufor_trt.engine.preprocess import size_label
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES
from trufor_trt.precision.blocks import attention_chains, block_of, pixel_sum_chains
from trufor_trt.precision.budgets import FP16_BUDGET
from trufor_trt.precision.conv16 import channel_centers, lower_convolutions
from trufor_trt.precision.flops import node_flops
from trufor_trt.precision.fp16 import KERNEL_MODELS, STRESS_MODEL, lower_to_fp16, tensor_types, upcast_fp16
from trufor_trt.precision.weight_store import INLINE, WeightStore
from trufor_trt.export.chain_parts import cut_from, with_outputs
from trufor_trt.export.fp16_search import (ATTENTION, NOISEPRINT, binding_output, give_back_until_within,
                                           take_back)
from trufor_trt.export.measure import (KernelOrder, NetworkRuns, budget_share, create_session_from_model,
                                      deviation, reference_analyses, under_kernel_models, unchanged_tensors,
                                      unused_size_key, worst_by_output)

ALWAYS_FP32 = frozenset({"LayerNormalization", "Softmax", "Cast", "Constant"})
FP16_RANGE_LIMIT = 2.0 ** 14
UNIT_SHARE = 0.5
CENTERED_SHARE = 0.1
PLAN_MARGIN = 0.8  # of the budget on the crops: full-size images deviate more (more pixels)
NOISEPRINT_OUTPUT = OUTPUT_NAMES[2]  # the graph output Noiseprint++'s last convolution writes
FLOP_SIZE = (512, 512)  # the size unit FLOPs are weighed at
SOLO_INPUTS = 2
HALF_SIZE_SEARCH_FROM = 512  # px, the shorter side: below it a full-size trial costs little
# Budget share alone / FLOP share at 512 px: on the seed-0 crops the units ranged 0.6-40, the
# outliers being the input normalisation (no FLOPs: it rounds the RGB stream's input, which
# moved airplane_44652's score by 2.7e-3 while the calibration crops showed 2e-4) and
# Noiseprint++'s first and last layers (100-170, 0.3% of the FLOPs together).
MAX_COST_PER_FLOP_SHARE = 50



@dataclass(frozen=True)
class Unit:
    name: str
    nodes: frozenset  # lowered by lower_to_fp16
    conv: str = ""  # a Noiseprint++ convolution, lowered by lower_convolutions


@dataclass
class Fp16Plan:
    half_nodes: set = field(default_factory=set)  # every node computing in float16
    conv_forms: dict = field(default_factory=dict)  # Noiseprint++ conv -> "centered" | "centered_split"
    centers: dict = field(default_factory=dict)  # Noiseprint++ conv -> its input's channel centers
    units: dict = field(default_factory=dict)  # unit -> {range, solo deviation, form, decision}
    deviation_by_size: dict = field(default_factory=dict)  # "HxW" (or "crops") -> deviation
    sizes_measured: list = field(default_factory=list)
    stress: dict = field(default_factory=dict)  # deviation on the crops under STRESS_MODEL
    searched_at: dict = field(default_factory=dict)  # half-size search crop "HxW" -> its last deviation

    def report(self) -> dict:
        return {"budget_max_abs": FP16_BUDGET, "unit_share": UNIT_SHARE, "plan_margin": PLAN_MARGIN,
                "max_cost_per_flop_share": MAX_COST_PER_FLOP_SHARE,
                "range_limit": FP16_RANGE_LIMIT, "kernel_models": list(KERNEL_MODELS), "units": self.units,
                "noiseprint_conv_forms": self.conv_forms,
                "noiseprint_centers": {conv: [float(value) for value in center]
                                       for conv, center in self.centers.items()},
                "deviation_vs_fp32": worst_by_output(self.deviation_by_size),
                "deviation_by_size": self.deviation_by_size, "sizes_measured": self.sizes_measured,
                "searched_at_half_size": self.searched_at, f"stress_{STRESS_MODEL}": self.stress}


def candidate_units(model: onnx.ModelProto) -> list:
    """Every unit that may be lowered. Besides the sensitive operators, the sums over all
    pixels stay FP32: their range grows with the image, so no calibration set bounds it (at
    1536x2048 the fusion context overflows float16). A block's self-attention products (the
    scaled query, the scores and the context) are a unit of their own: they grow with the
    number of tokens, the rest of the block does not."""
    size_dependent = {name for chain in pixel_sum_chains(model) for name in chain}
    attention = {name for chain in attention_chains(model) for name in chain}
    blocks, units = {}, []
    for node in model.graph.node:
        if node.op_type in ALWAYS_FP32 or node.name in size_dependent:
            continue
        block = block_of(node.name)
        if block != NOISEPRINT:
            unit = f"{block}, {ATTENTION}" if node.name in attention else block
            blocks.setdefault(unit, set()).add(node.name)
        elif node.op_type == "Conv":
            units.append(Unit(f"{NOISEPRINT} layer {len(units) + 1}", frozenset(), node.name))
    return units + [Unit(block, frozenset(nodes)) for block, nodes in sorted(blocks.items())]


def lower_plan(model: onnx.ModelProto, half_nodes: set, conv_forms: dict, centers: dict, store=INLINE) -> tuple:
    """(the graph with the plan's nodes in float16, names of all its float16 nodes); `store`:
    where its weights are held (precision/weight_store.py)."""
    lowered, conv_half = lower_convolutions(model, conv_forms, centers, store) if conv_forms else (model, set())
    # Each pass copies the graph: skipped where it has nothing to lower (a trial of one unit).
    lowered = lower_to_fp16(lowered, half_nodes, store) if half_nodes else lowered
    return lowered, set(half_nodes) | conv_half


def recorded_plan(model: onnx.ModelProto, report: dict) -> dict:
    """A manifest's FP16 plan as the nodes it lowers: {"units", "half_nodes", "conv_forms", "centers"}."""
    earned = [unit for unit in candidate_units(model)
              if report["units"].get(unit.name, {}).get("decision") == "fp16" and not unit.conv]
    return {"units": report["units"], "half_nodes": set().union(*(unit.nodes for unit in earned)),
            "conv_forms": dict(report["noiseprint_conv_forms"]),
            "centers": {conv: np.asarray(center, np.float32) for conv, center in report["noiseprint_centers"].items()}}


def _unit_outputs(model: onnx.ModelProto, units: list) -> dict:
    """float tensor -> the unit whose node writes it."""
    types = tensor_types(model)
    owner = {name: unit for unit in units for name in (unit.nodes or {unit.conv})}
    return {output: owner[node.name].name for node in model.graph.node if node.name in owner
            for output in node.output if types.get(output) == onnx.TensorProto.FLOAT}


def activation_ranges(model: onnx.ModelProto, inputs: list, units: list, store=INLINE) -> dict:
    """unit -> the largest |activation| its nodes wrote on the calibration inputs (`store`:
    where `model` holds its weights)."""
    owner = _unit_outputs(model, units)
    session = create_session_from_model(with_outputs(model, owner), store)
    names = [output.name for output in session.get_outputs()]
    ranges = {unit.name: 0.0 for unit in units}
    for prepared in inputs:
        for name, value in zip(names, session.run(names, {"image": prepared})):
            if name in owner:
                ranges[owner[name]] = max(ranges[owner[name]], float(np.max(np.abs(value))))
    return ranges


def has_float16_convolution(graph: onnx.ModelProto) -> bool:
    """Whether a Conv reads float16 weights: where none does, the kernel models coincide."""
    half = {init.name for init in graph.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    return any(node.op_type == "Conv" and node.input[1] in half for node in graph.graph.node)


class Measure:
    """Deviation of candidate graphs from FP32 on a fixed set of inputs (references kept), the
    worst under each kernel model (precision/fp16.py). Its graphs hold their weights in
    `store` (precision/weight_store.py): a trial copies and serializes no weights."""

    def __init__(self, model, inputs, head, centers: dict, share=budget_share, store=None, order=None):
        """`share`: errors -> the share of the budget they use (what `stop_above` is in); `store`:
        a WeightStore to share with other measures (default: one of its own); `order`: a
        KernelOrder to share with them (default: one of its own)."""
        self.store, self.order = store or WeightStore(), order or KernelOrder()
        self.model, self.head, self.centers, self.share = self.store.detach(model), head, centers, share
        # Trials change a few units at a time: each runs from the block outputs it shares with
        # the reference or a recent trial (NetworkRuns' reuse_blocks).
        self.runs = NetworkRuns(inputs, self.model, attention_chains(model), reuse_blocks=True, store=self.store)
        self.reference = reference_analyses(self.runs, head)

    def graph(self, graph: onnx.ModelProto, stop_above: float = math.inf, kernels=None) -> dict:
        """The deviation under `kernels` (default: every kernel model, in the shared order)."""
        graph = self.store.detach(graph)
        measured = under_kernel_models(
            lambda kernel: deviation(upcast_fp16(graph, kernel, self.store), self.reference, self.runs, self.head),
            kernels or self.order.kernels, stop_above, differ=has_float16_convolution(graph), share=self.share)
        if kernels is None:
            self.order.note(measured["by_kernel_model"], self.share)
        return measured

    def __call__(self, half_nodes: set, conv_forms: dict, stop_above: float = math.inf) -> dict:
        return self.graph(lower_plan(self.model, half_nodes, conv_forms, self.centers, self.store)[0], stop_above)


def noiseprint_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx.utils import Extractor

    return Extractor(model).extract_model([INPUT_NAME], [NOISEPRINT_OUTPUT])


def _convolution_inputs(graph: onnx.ModelProto) -> dict:
    """Conv name -> the tensor it reads."""
    return {node.name: node.input[0] for node in graph.graph.node if node.op_type == "Conv"}


def noiseprint_activations(graph: onnx.ModelProto, inputs: list) -> list:
    """Per input: Noiseprint++'s output and the input of each of its convolutions (tensor ->
    value, the image included), from one run of `graph` (Noiseprint++ alone)."""
    session = create_session_from_model(with_outputs(graph, set(_convolution_inputs(graph).values())))
    names = [output.name for output in session.get_outputs()]
    return [{INPUT_NAME: prepared, **dict(zip(names, session.run(names, {INPUT_NAME: prepared})))}
            for prepared in inputs]


def noiseprint_centers(graph: onnx.ModelProto, activations: list) -> dict:
    """Conv name -> the mean of each channel of its input over the inputs of `activations`
    (noiseprint_activations), float16-exact. `graph`: Noiseprint++ alone."""
    convs = _convolution_inputs(graph)
    sums = {}
    for values in activations:
        for name in convs.values():
            sums[name] = sums.get(name, 0.0) + values[name].astype(np.float64).mean(axis=(0, 2, 3))
    return {conv: channel_centers(sums[name] / len(activations)) for conv, name in convs.items()}


class NoiseprintMeasure:
    """Deviation of Noiseprint++ alone (its graph cut out of the network) with some of its
    convolutions lowered: what a layer moves first is Noiseprint++ itself, and this trial costs
    a fraction of a whole-network one (the joint trials then measure every output). The FP32
    graph's input to each convolution is kept (`activations`: noiseprint_activations'), so a
    trial runs from the input of the first layer it changes (the layers before compute as the
    FP32 graph does): half the layers, on average, for a layer tried alone."""

    def __init__(self, graph, activations: list, centers: dict):
        self.graph, self.centers = graph, centers
        self.inputs = [values[INPUT_NAME] for values in activations]
        self.reference = [values[NOISEPRINT_OUTPUT] for values in activations]
        self._kept = {name: [values[name] for values in activations]
                      for name in set(_convolution_inputs(graph).values()) - {INPUT_NAME}}

    def _run(self, graph):
        given = unchanged_tensors(graph, self.graph, {INPUT_NAME}) & set(self._kept)
        part = cut_from(graph, given, {name: self._kept[name][0] for name in given}) if given else graph
        session = create_session_from_model(part)
        read = [value.name for value in session.get_inputs()]
        return [session.run([NOISEPRINT_OUTPUT], {name: prepared if name == INPUT_NAME else self._kept[name][index]
                                                  for name in read})[0]
                for index, prepared in enumerate(self.inputs)]

    def _deviation(self, conv_forms: dict, kernel: str) -> dict:
        lowered = upcast_fp16(lower_convolutions(self.graph, conv_forms, self.centers)[0], kernel)
        worst = max(float(np.max(np.abs(ours - truth))) for ours, truth in zip(self._run(lowered), self.reference))
        return {"np++": worst if np.isfinite(worst) else float("inf")}

    def __call__(self, half_nodes: set, conv_forms: dict, stop_above: float = math.inf) -> dict:
        return under_kernel_models(lambda kernel: self._deviation(conv_forms, kernel), stop_above=stop_above)


def _solo(unit: Unit, measure, entry: dict, on_step) -> str:
    """The unit's form alone ("" if it does not earn FP16), its deviation noted in `entry`. A
    Noiseprint++ layer keeps the centered form where it moves the outputs by at most
    CENTERED_SHARE of the budget (many such layers add up), else the split form if that earns."""
    forms = ("centered", "centered_split") if unit.conv else ("fp16",)
    shares = {}
    for form in forms:
        on_step(f"trying {unit.name} in FP16" + (f" ({form})" if unit.conv else ""))
        errors = measure(set(unit.nodes), {unit.conv: form} if unit.conv else {}, stop_above=UNIT_SHARE)
        entry.setdefault("solo_deviation", {})[form] = errors
        shares[form] = budget_share(errors)
        if form == "centered" and shares[form] <= CENTERED_SHARE:
            break
    best = min(shares, key=shares.get)
    if shares[best] > UNIT_SHARE:
        entry["decision"] = f"fp32: alone it uses {shares[best]:.0%} of the FP16 budget"
        return ""
    entry["decision"] = "fp16"
    entry["form"] = best
    entry["budget_share"] = round(shares[best], 4)
    return best


def _earn_alone(units: list, ranges: dict, flops: dict, solo: dict, decisions: dict, on_step) -> tuple:
    """(earned: name -> (Unit, form), cost: name -> budget share per FLOP) of the units that earn
    FP16 alone (criteria 1 and 2); each unit's record in `decisions`. `solo`: the measures of a
    Noiseprint++ layer ("conv") and of a block ("block") alone."""
    network_flops = sum(flops.values())
    earned, cost = {}, {}
    for unit in units:
        entry = decisions[unit.name] = {"max_abs_activation": ranges[unit.name]}
        unit_flops = sum(flops.get(name, 0) for name in (unit.nodes or {unit.conv}))
        entry["gflop_at_512"] = round(unit_flops / 1e9, 3)
        if ranges[unit.name] > FP16_RANGE_LIMIT:
            entry["decision"] = "fp32: activations beyond the float16-safe range"
            continue
        form = _solo(unit, solo["conv" if unit.conv else "block"], entry, on_step)
        flop_share = unit_flops / network_flops
        if form and entry["budget_share"] > MAX_COST_PER_FLOP_SHARE * flop_share:
            entry["decision"] = (f"fp32: alone it uses {entry.pop('budget_share'):.0%} of the FP16 budget "
                                 f"for {flop_share:.2%} of the FLOPs")
            entry.pop("form")
        elif form:
            earned[unit.name] = (unit, form)
            cost[unit.name] = entry["budget_share"] / max(unit_flops, 1)
    return earned, cost


def _assemble(units: dict) -> tuple:
    """(half nodes, conv forms) of the earned units: name -> (Unit, form)."""
    half = set().union(*(unit.nodes for unit, _ in units.values())) if units else set()
    return half, {unit.conv: form for unit, form in units.values() if unit.conv}


def half_size_crop(prepared: np.ndarray) -> np.ndarray:
    """The centre crop of half the height and width."""
    height, width = prepared.shape[2:]
    crop_height, crop_width = height // 2, width // 2
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return np.ascontiguousarray(prepared[:, :, top:top + crop_height, left:left + crop_width])


def full_size_steps(large: np.ndarray, plan: Fp16Plan) -> list:
    """(image, limit, where its deviation is recorded) for each step of one full-size check: the
    half-size search within PLAN_MARGIN (from HALF_SIZE_SEARCH_FROM), then the full size itself
    within the budget."""
    steps = [(large, 1.0, plan.deviation_by_size)]
    if min(large.shape[2:]) >= HALF_SIZE_SEARCH_FROM:
        steps.insert(0, (half_size_crop(large), PLAN_MARGIN, plan.searched_at))
    return steps


def _check_full_size(large: np.ndarray, plan: Fp16Plan, earned: dict, cost: dict, measure_on, on_step) -> None:
    """Give back until the earned units hold on `large` (full_size_steps: its half-size search,
    then the full size, where units given back in vain are taken back). `measure_on(image)`: a
    Measure on that image."""
    for image, limit, record in full_size_steps(large, plan):
        size, at_size = unused_size_key(image, record), measure_on(image)
        kept = {}  # the last trial within the limit: the record of a unit taken back in vain is not the plan's

        def on_large(units, limit, at_size=at_size, size=size, record=record, kept=kept):
            errors = record[size] = at_size(*_assemble(units), stop_above=limit)
            if budget_share(errors) <= limit:
                kept["errors"] = errors
            return budget_share(errors), binding_output(errors)

        steps = give_back_until_within(earned, cost, on_large, limit, plan.units, f"at {size}", on_step,
                                       full_size=True)
        if record is plan.deviation_by_size:
            take_back(earned, steps, on_large, limit, plan.units, f"at {size}", on_step)
            record[size] = kept.get("errors", record.get(size))
            plan.sizes_measured.append(size)


def plan_fp16(model: onnx.ModelProto, inputs: list, head, large_inputs=(), on_step=print) -> Fp16Plan:
    """The plan from calibration crops `inputs`, checked on `large_inputs` at full size."""
    noiseprint = noiseprint_graph(model)
    activations = noiseprint_activations(noiseprint, inputs)
    centers = noiseprint_centers(noiseprint, activations)
    store, order = WeightStore(), KernelOrder()
    model = store.detach(model)
    measure = Measure(model, inputs, head, centers, store=store, order=order)
    # Alone, a block is tried on the first SOLO_INPUTS crops only (whole-network trials are
    # most of the planning time; the joint trials on every crop and at full size decide). A
    # Noiseprint++ layer is tried on every crop: its trials are cheap, and on the seed-0
    # checkpoint the first layer moved Noiseprint++ 10x more on the 8th crop than on the first two.
    solo = {"conv": NoiseprintMeasure(noiseprint, activations, centers),
            "block": Measure(model, inputs[:SOLO_INPUTS], head, centers, store=store, order=order)}
    units = candidate_units(model)
    on_step(f"measuring activation ranges of {len(units)} units")
    ranges = activation_ranges(model, inputs, units, store)
    plan = Fp16Plan()
    earned, cost = _earn_alone(units, ranges, node_flops(model, *FLOP_SIZE), solo, plan.units, on_step)
    del solo, activations  # Noiseprint++'s activations at every layer are not needed past here

    def on_crops(units, limit):
        errors = plan.deviation_by_size["crops"] = measure(*_assemble(units), stop_above=limit)
        return budget_share(errors), binding_output(errors)

    give_back_until_within(earned, cost, on_crops, PLAN_MARGIN, plan.units, "on the calibration crops", on_step)
    plan.sizes_measured = sorted({size_label(x) for x in inputs})
    checked_on_crops = len(earned)
    # Largest first: a unit given back there is given back for the smaller ones too.
    for large in sorted(large_inputs, key=lambda x: -x.shape[2] * x.shape[3]):
        _check_full_size(large, plan, earned, cost, lambda image: Measure(model, [image], head, centers, store=store,
                                                                          order=order), on_step)
    plan.half_nodes, plan.conv_forms = _assemble(earned)
    plan.centers = {conv: centers[conv] for conv in plan.conv_forms}
    final = lower_plan(model, plan.half_nodes, plan.conv_forms, centers, store)[0]
    if len(earned) != checked_on_crops:
        plan.deviation_by_size["crops"] = measure.graph(final)
    on_step(f"measuring the plan under the {STRESS_MODEL} stress model")
    plan.stress = measure.graph(final, kernels=(STRESS_MODEL,))
    return plan
