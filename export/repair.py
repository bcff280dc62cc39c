"""`build --fp16|--int8 --repair N`: an engine that its own GPU measures over budget gives units
back to FP32 and is built again.

The FP16 and INT8 plans are made on the CPU, in a simulation of the kernels; what TensorRT's
kernels do on a given GPU (their tactics, their accumulation) is known only there. So when
`build`'s validation finds the engine over its budget, the earned unit that used the most of the
budget alone (the plan's own order of sensitivity) goes back to FP32 and the engine is built and
validated again, until it holds or N rebuilds were made. FP16: the graph is lowered again from
the FP32 graph without the unit. INT8: the unit's Q/DQ come out of the variant's graph and its
operators read their FP32 weights again (its quantization scales, calibrated at export, are kept
for the other units: no calibration images are needed on the GPU's machine). Every try is
recorded in the engine's sidecar (the units given back, its validation, its FLOP shares); an
engine that never holds is kept and marked, as one that was never repaired.
"""

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import onnx

from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.tensorrt_plan import Sidecar, sidecar_path
from trufor_trt.files import write_atomically
from trufor_trt.precision.flops import flops_by_precision, node_precisions
from trufor_trt.export.fp16_plan import FLOP_SIZE, candidate_units, lower_plan, recorded_plan

DEFAULT_REPAIRS = 3
GIVEN_BACK = "given back: over budget on the GPU it was built for"
# What a plan records of a unit alone: the share of its precision's budget (FP16) or target (INT8).
SOLO_SHARE = {"fp16": "budget_share", "int8": "target_share"}


def sensitivity_order(plan_report: dict, precision: str = "fp16") -> list:
    """The plan's units that earned `precision`, the one that used the most of the budget alone first."""
    share = SOLO_SHARE[precision]
    earned = [(name, entry) for name, entry in plan_report["units"].items() if entry.get("decision") == precision]
    return [name for name, entry in sorted(earned, key=lambda item: (-item[1].get(share, 0.0), item[0]))]


def graph_giving_back(fp32: onnx.ModelProto, plan_report: dict, given_back: list) -> tuple:
    """(the FP16 plan's graph with the units `given_back` in FP32, the names of its float16 nodes)."""
    units = {name: ({**entry, "decision": GIVEN_BACK} if name in given_back else entry)
             for name, entry in plan_report["units"].items()}
    plan = recorded_plan(fp32, {**plan_report, "units": units})
    returned = {unit.conv for unit in candidate_units(fp32) if unit.conv and unit.name in given_back}
    forms = {conv: form for conv, form in plan["conv_forms"].items() if conv not in returned}
    return lower_plan(fp32, plan["half_nodes"], forms, plan["centers"])


def int8_graph_giving_back(fp32: onnx.ModelProto, int8_graph: onnx.ModelProto, given_back: list) -> onnx.ModelProto:
    """The INT8 variant's graph with the units `given_back` in FP32: their Q/DQ removed, their
    operators reading the FP32 graph's weights; every other node as it was."""
    from trufor_trt.calibration.int8 import keep_int8_only

    returned = set().union(*(set(unit.nodes) | {unit.conv} for unit in candidate_units(fp32)
                             if unit.name in given_back))
    int8 = {name for name, precision in node_precisions(int8_graph).items() if precision == "int8"}
    return keep_int8_only(int8_graph, fp32, int8 - returned)


def flop_shares(fp32: onnx.ModelProto, graph: onnx.ModelProto) -> dict:
    """The network's FLOPs at 512x512 by precision, as fractions."""
    return flops_by_precision(fp32, graph, *FLOP_SIZE)["network_share"]


def graph_maker(model: ModelDir, fp32: onnx.ModelProto, precision: str) -> Callable[[list], onnx.ModelProto]:
    """given_back -> the variant's graph with those units in FP32."""
    if precision == "fp16":
        plan = model.manifest["variants"]["fp16"]["fp16_plan"]
        return lambda given_back: graph_giving_back(fp32, plan, given_back)[0]
    int8_graph = onnx.load(model.variant_path("int8"))
    return lambda given_back: int8_graph_giving_back(fp32, int8_graph, given_back)


def repair(first: dict, rebuild: Callable[[list], dict], order: list, rebuilds: int, on_step) -> list:
    """The tries, each {"given_back", "validation", ...}: `first` (the engine as planned: its
    validation record), then, while the last is over budget and rebuilds are left, one more unit
    of `order` given back (`rebuild(given_back)` builds and validates that graph, returning the
    try's record: its "validation" and what else the sidecar keeps of it)."""
    tries = [{"given_back": [], **first}]
    for name in order[:rebuilds]:
        last = tries[-1]["validation"]
        if last["within_budget"]:
            break
        given_back = tries[-1]["given_back"] + [name]
        on_step(f"over the budget on this GPU ({last['summary']}): giving {name} back to FP32, building again")
        tries.append({"given_back": given_back, **rebuild(given_back)})
    return tries


def record_repair(path: Path, tries: list) -> Sidecar:
    """The sidecar at `path` with the tries recorded, the last one's validation being the engine's."""
    sidecar = replace(Sidecar.read(path), validation=tries[-1]["validation"],
                      repair={"given_back": tries[-1]["given_back"], "tries": tries})
    sidecar.write(path)
    return sidecar


def repair_engine(model_dir, engine: Path, precision: str, validate_engine: Callable, rebuilds: int,
                  build_options: dict, on_step) -> Sidecar:
    """`build --repair`: the FP16 or INT8 engine at `engine`, validated over budget, built again
    with units given back (repair) on this GPU; the engine left is the last try's, its sidecar
    recording every try. `validate_engine(model, engine)` validates a build (validate.py's, as
    `build` calls it) and returns its sidecar."""
    from trufor_trt.export.tensorrt_build import build_engine

    model = ModelDir.open(model_dir)
    plan = model.manifest["variants"][precision][f"{precision}_plan"]
    fp32 = onnx.load(model.variant_path("fp32"))
    graph_without = graph_maker(model, fp32, precision)
    graph_file = engine.with_name(f".{engine.name}.repair.{os.getpid()}.onnx")

    def rebuild(given_back: list) -> dict:
        graph = graph_without(given_back)
        write_atomically(graph_file, graph.SerializeToString())
        try:
            build_engine(model.path, precision, graph_path=graph_file, on_step=on_step, **build_options)
        finally:
            graph_file.unlink(missing_ok=True)
        validated = validate_engine(model, engine)
        return {"validation": validated.validation, "flops_at_512": flop_shares(fp32, graph)}

    first = {"validation": Sidecar.read(sidecar_path(engine)).validation,
             "flops_at_512": flop_shares(fp32, onnx.load(model.variant_path(precision)))}
    tries = repair(first, rebuild, sensitivity_order(plan, precision), rebuilds, on_step)
    on_step(f"repair: {len(tries) - 1} rebuild(s), given back {json.dumps(tries[-1]['given_back'])}: "
            + tries[-1]["validation"]["summary"])
    return record_repair(sidecar_path(engine), tries)
