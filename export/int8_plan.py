"""Which parts compute in INT8: earned per unit on top of the FP16 plan, measured, not assumed.

The INT8 variant starts from the model folder's FP16 plan (units that earned FP16 run FP16,
the rest FP32) and moves a unit's convolutions and matrix products to INT8 (Q/DQ, see
calibration/int8.py) only where that keeps the published outputs near FP32:
1. the calibration method and weight scales are chosen first: every candidate unit quantized
   at once with MinMax, Percentile and Entropy ranges (weights per output channel), then the
   best of those with weights per tensor; the one that moves the outputs least is kept;
2. a unit alone in INT8 may use at most UNIT_SHARE of INT8_TARGET (map 5e-2, score 2e-2);
3. the earned units together stay within PLAN_MARGIN of the target on the calibration crops
   and within it on every full-size image; else the unit that costs the most per FLOP it
   brings is given back to its FP16-plan precision.
Candidates: the units that earned FP16, but Noiseprint++'s layers: measured on the seed-0
checkpoint, each alone in INT8 even centered (per-channel weights, the centered input's range
per tensor) used 51-381% of the INT8 target (docs/precision.md), where half earns. The self-attention and pixel-sum products stay out
of INT8: both operands are activations, and their ranges follow the image.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from trufor_trt.calibration.int8 import (CALIBRATION_METHODS, QUANTIZED_OPERATORS, describe,
                                         keep_int8_only, quantize_nodes)
from trufor_trt.engine.preprocess import size_label
from trufor_trt.engine.runner import INPUT_NAME
from trufor_trt.export.chain_parts import cut_after_noiseprint, join_after_noiseprint
from trufor_trt.export.measure import KernelOrder, create_session_from_model, unused_size_key
from trufor_trt.precision.blocks import attention_chains, pixel_sum_chains
from trufor_trt.precision.budgets import INT8_TARGET
from trufor_trt.precision.flops import node_flops
from trufor_trt.precision.weight_store import WeightStore
from trufor_trt.export.fp16_plan import FLOP_SIZE, NOISEPRINT_OUTPUT, Measure, candidate_units, lower_plan
from trufor_trt.export.fp16_search import NOISEPRINT, give_back_until_within

UNIT_SHARE = 0.5
PLAN_MARGIN = 0.8


def int8_share(errors: dict) -> float:
    """The largest fraction of the target any output uses (a flipped decision: inf)."""
    if errors.get("flipped"):
        return float("inf")
    return max(errors[name] / INT8_TARGET[name] for name in INT8_TARGET)


@dataclass
class Int8Plan:
    int8_nodes: set = field(default_factory=set)
    half_nodes: set = field(default_factory=set)
    method: str = "MinMax"
    per_channel: bool = True
    methods_compared: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    deviation_by_size: dict = field(default_factory=dict)
    sizes_measured: list = field(default_factory=list)

    def report(self) -> dict:
        return {"target_max_abs": INT8_TARGET, "unit_share": UNIT_SHARE, "plan_margin": PLAN_MARGIN,
                "quantization": describe(self.method, self.per_channel),
                "methods_compared": self.methods_compared, "units": self.units,
                "deviation_by_size": self.deviation_by_size, "sizes_measured": self.sizes_measured}


class _Int8Graphs:
    """Graphs with a given set of nodes in INT8 and the FP16 plan elsewhere. Each quantization
    (method, weight scales) runs once, over every candidate; a trial keeps a subset of it.
    Every candidate comes after Noiseprint++, so only that part is calibrated and quantized,
    fed the FP32 Noiseprint++'s output: the calibration's 840 tensors were Noiseprint++'s at
    full resolution for a third of its time and most of its memory. The graphs hold their
    weights in `store` (precision/weight_store.py)."""

    def __init__(self, fp32: onnx.ModelProto, inputs: list, fp16: dict, candidates: set, scratch: Path, store):
        """`fp32`: the FP32 graph, its weights in `store`."""
        self.fp32, self.scratch, self.store = fp32, scratch, store
        self.half_nodes, self.conv_forms, self.candidates = fp16["half_nodes"], fp16["conv_forms"], candidates
        self.centers = fp16["centers"]
        parts = cut_after_noiseprint(fp32)
        self.noiseprint_part, self.rest_path = parts["noiseprint"], scratch / "after_noiseprint.onnx"
        onnx.save(store.attach(parts["rest"]), self.rest_path)  # the quantizer reads a whole graph
        session = create_session_from_model(self.noiseprint_part, store)
        self.feeds = [{INPUT_NAME: x, NOISEPRINT_OUTPUT: session.run([NOISEPRINT_OUTPUT], {INPUT_NAME: x})[0]}
                      for x in inputs]
        self._quantized = {}

    def _all_quantized(self, method: str, per_channel: bool) -> onnx.ModelProto:
        key = (method, per_channel)
        if key not in self._quantized:
            rest = quantize_nodes(self.rest_path, self.feeds, self.candidates, method, per_channel, self.scratch)
            self._quantized[key] = join_after_noiseprint(self.noiseprint_part, self.store.detach(rest), self.fp32)
        return self._quantized[key]

    def build(self, int8_nodes: set, method: str, per_channel: bool) -> tuple:
        """(graph, names of its float16 nodes)."""
        quantized = keep_int8_only(self._all_quantized(method, per_channel), self.fp32, int8_nodes)
        quantized.ir_version = self.fp32.ir_version
        forms = {conv: form for conv, form in self.conv_forms.items() if conv not in int8_nodes}
        return lower_plan(quantized, self.half_nodes - int8_nodes, forms, self.centers, self.store)


def _candidates(fp32: onnx.ModelProto, fp16_units: dict) -> dict:
    """unit name -> its nodes that may be quantized."""
    activations_only = {name for chain in attention_chains(fp32) + pixel_sum_chains(fp32) for name in chain}
    operators = {node.name for node in fp32.graph.node if node.op_type in QUANTIZED_OPERATORS}
    candidates = {}
    for unit in candidate_units(fp32):
        entry = fp16_units.get(unit.name, {})
        if entry.get("decision") != "fp16" or unit.conv:
            continue
        nodes = (set(unit.nodes) | {unit.conv}) & operators - activations_only
        if nodes:
            candidates[unit.name] = nodes
    return candidates


def _choose_quantization(graphs: _Int8Graphs, measure: Measure, everything: set, plan: Int8Plan, on_step) -> None:
    """Every candidate in INT8 under each calibration method (weights per channel), then the
    best of those with weights per tensor; the quantization that moves the outputs least wins."""
    def trial(method: str, per_channel: bool) -> None:
        on_step(f"INT8 everywhere it may go, {_key(method, per_channel)}")
        errors = measure.graph(graphs.build(everything, method, per_channel)[0])
        plan.methods_compared[_key(method, per_channel)] = {"deviation": errors, "share": round(int8_share(errors), 4)}

    for method in CALIBRATION_METHODS:
        trial(method, True)
    trial(min(CALIBRATION_METHODS, key=lambda method: plan.methods_compared[_key(method, True)]["share"]), False)
    best = min(plan.methods_compared, key=lambda key: plan.methods_compared[key]["share"])
    plan.method, plan.per_channel = best.split(", ")[0], best.endswith("per channel")


def _key(method: str, per_channel: bool) -> str:
    return f"{method}, weights per {'channel' if per_channel else 'tensor'}"


def plan_int8(fp32: onnx.ModelProto, inputs: list, head, fp16: dict, large_inputs=(),
              on_step=print) -> tuple:
    """(plan, graph, names of its float16 nodes). `fp16`: {"units": the FP16 plan's unit
    decisions, "half_nodes", "conv_forms"} of the folder's FP16 variant."""
    store, order = WeightStore(), KernelOrder()
    light = store.detach(fp32)
    measure = Measure(light, inputs, head, fp16["centers"], share=int8_share, store=store, order=order)
    candidates = _candidates(fp32, fp16["units"])
    flops = node_flops(fp32, *FLOP_SIZE)
    plan = Int8Plan()
    with tempfile.TemporaryDirectory(prefix="trufor-int8-") as scratch:
        everything = set().union(*candidates.values()) if candidates else set()
        graphs = _Int8Graphs(light, inputs, fp16, everything, Path(scratch), store)
        _choose_quantization(graphs, measure, everything, plan, on_step)
        earned, cost = {}, {}
        for name, nodes in candidates.items():
            on_step(f"trying {name} in INT8")
            errors = measure.graph(graphs.build(nodes, plan.method, plan.per_channel)[0], stop_above=UNIT_SHARE)
            share = int8_share(errors)
            entry = plan.units[name] = {"solo_deviation": errors, "target_share": round(share, 4),
                                        "gflop_at_512": round(sum(flops[n] for n in nodes) / 1e9, 3)}
            if share > UNIT_SHARE:
                entry["decision"] = f"fp16: alone in INT8 it uses {share:.0%} of the INT8 target"
            else:
                entry["decision"] = "int8"
                earned[name], cost[name] = nodes, share / max(sum(flops[n] for n in nodes), 1)
        for name in set(fp16["units"]) - set(candidates):
            if fp16["units"][name].get("decision") == "fp16":
                reason = "Noiseprint++ stays centered FP16" if name.startswith(NOISEPRINT) else "nothing to quantize"
                plan.units[name] = {"decision": f"fp16: {reason}"}

        def share_of(units, limit, at=measure, size="crops"):
            nodes = set().union(*units.values())
            plan.deviation_by_size[size] = at.graph(graphs.build(nodes, plan.method, plan.per_channel)[0],
                                                    stop_above=limit)
            return int8_share(plan.deviation_by_size[size]), ""

        give_back_until_within(earned, cost, share_of, PLAN_MARGIN, plan.units, "on the calibration crops", on_step)
        plan.sizes_measured = sorted({size_label(x) for x in inputs})
        for large in sorted(large_inputs, key=lambda x: -x.shape[2] * x.shape[3]):
            size = unused_size_key(large, plan.deviation_by_size)
            at_size = Measure(light, [large], head, fp16["centers"], share=int8_share, store=store, order=order)
            give_back_until_within(earned, cost, lambda units, limit, at=at_size, size=size: share_of(units, limit, at, size),
                                   1.0, plan.units, f"at {size}", on_step, full_size=True)
            plan.sizes_measured.append(size)
        plan.int8_nodes = set().union(*earned.values()) if earned else set()
        graph, plan.half_nodes = graphs.build(plan.int8_nodes, plan.method, plan.per_channel)
        if large_inputs and "crops" in plan.deviation_by_size:
            plan.deviation_by_size["crops"] = measure.graph(graph)
    return plan, store.attach(graph), plan.half_nodes
