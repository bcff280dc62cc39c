"""`build --repair`: an FP16 or INT8 engine over budget on its GPU gives units back and is built
again. ONNX Runtime plays the engine: the variant's graph under a kernel model made to fail on a
named unit (its output scaled by 1.5 wherever the unit computes in FP16, or in INT8); the loop,
the order, the graphs and the sidecar's record are the project's own."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graph surgery needs onnx (the export extra)")
from onnx import helper, numpy_helper

from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.tensorrt_plan import Sidecar, validation_record
from trufor_trt.precision.budgets import FP16_BUDGET, INT8_TARGET
from trufor_trt.precision.flops import node_precisions
from trufor_trt.precision.fp16 import upcast_fp16

BROKEN_UNIT = "localization decoder"
# A plan of three units (their solo shares as a plan records them), the broken one the most sensitive.
PLAN = {"units": {BROKEN_UNIT: {"decision": "fp16", "budget_share": 0.3},
                  "confidence decoder": {"decision": "fp16", "budget_share": 0.2},
                  "fusion, stage 4": {"decision": "fp16", "budget_share": 0.1},
                  "rgb stream, stage 1": {"decision": "fp32: alone it uses 80% of the FP16 budget"}},
        "noiseprint_conv_forms": {}, "noiseprint_centers": {}}


def _broken_where_reduced(graph, unit_nodes: frozenset, reduced_nodes: set):
    """`graph` (already upcast) with the unit's last node's output scaled by 1.5, where the unit
    computes in FP16 or INT8 (`reduced_nodes`): a GPU kernel that is wrong on that unit alone."""
    if not unit_nodes & reduced_nodes:
        return graph
    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    last = [node for node in graph.graph.node if node.name in unit_nodes][-1]
    wrong = last.output[0] + "/wrong_kernel"
    for node in graph.graph.node:
        node.input[:] = [wrong if name == last.output[0] else name for name in node.input]
    for output in graph.graph.output:
        if output.name == last.output[0]:
            output.name = wrong
    graph.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "wrong_kernel_scale"))
    graph.graph.node.append(helper.make_node("Mul", [last.output[0], "wrong_kernel_scale"], [wrong]))
    return graph


class _PlayedEngine:
    """ONNX Runtime playing a GPU whose kernels are wrong on one unit: validates a graph as
    `build` validates an engine, on one 64 x 64 input under the fused kernel model."""

    def __init__(self, model: ModelDir, fp32, broken_unit: str):
        from trufor_trt.export.fp16_plan import candidate_units
        from trufor_trt.export.measure import NetworkRuns, reference_analyses

        self.fp32, self.head = fp32, model.detection_head()
        self.runs = NetworkRuns([np.random.default_rng(0).random((1, 3, 64, 64), np.float32)], fp32)
        self.reference = reference_analyses(self.runs, self.head)
        unit = next(unit for unit in candidate_units(fp32) if unit.name == broken_unit)
        self.broken = unit.nodes | {unit.conv}

    def validate(self, graph, reduced_nodes: set, budget: dict) -> dict:
        from trufor_trt.export.measure import deviation
        from trufor_trt.export.repair import flop_shares

        played = _broken_where_reduced(upcast_fp16(graph, "fused"), self.broken, reduced_nodes)
        errors = deviation(played, self.reference, self.runs, self.head)
        overall = {"map_max": errors["map"], "conf_max": errors["conf"], "score_error_max": errors["score"],
                   "noiseprint_max": errors["np++"], "decisions_flipped": errors["flipped"], "images": 1}
        return {"validation": validation_record(overall, budget, "one 64 x 64 input"),
                "flops_at_512": flop_shares(self.fp32, graph)}


def _quantized_nodes(graph) -> set:
    return {name for name, precision in node_precisions(graph).items() if precision == "int8"}


@pytest.mark.slow  # 19 s: three validations of the whole network on the CPU
def test_a_unit_over_budget_on_the_gpu_is_given_back_and_the_second_build_holds(model_seed0, tmp_path):
    from trufor_trt.export.repair import graph_giving_back, record_repair, repair, sensitivity_order

    model = ModelDir.open(model_seed0)
    fp32 = onnx.load(model.variant_path("fp32"))
    engine = _PlayedEngine(model, fp32, BROKEN_UNIT)

    def build_and_validate(given_back: list) -> dict:
        return engine.validate(*graph_giving_back(fp32, PLAN, given_back), FP16_BUDGET)

    order = sensitivity_order(PLAN)
    assert order == [BROKEN_UNIT, "confidence decoder", "fusion, stage 4"]
    tries = repair(build_and_validate([]), build_and_validate, order, 3, print)
    assert [attempt["given_back"] for attempt in tries] == [[], [BROKEN_UNIT]]
    assert not tries[0]["validation"]["within_budget"] and "map" in tries[0]["validation"]["summary"]
    assert tries[1]["validation"]["within_budget"], tries[1]["validation"]
    assert 0 < tries[1]["flops_at_512"]["fp16"] < tries[0]["flops_at_512"]["fp16"]
    sidecar_path = tmp_path / "engine.plan.json"
    Sidecar(precision="fp16", profile={}, tensorrt_version="10.3", device="test", compute_capability=[8, 7],
            onnx_file="trufor_fp16.onnx", onnx_sha256="0", strongly_typed=True, builder_flags=[], cleared_flags=[],
            tf32=False, workspace_gib=1.0, build_seconds=0.0, engine_sha256="0").write(sidecar_path)
    record_repair(sidecar_path, tries)
    written = json.loads(sidecar_path.read_text())
    assert written["validation"] == tries[-1]["validation"]
    assert written["repair"]["given_back"] == [BROKEN_UNIT] and len(written["repair"]["tries"]) == 2
    assert Sidecar.read(sidecar_path).repair == written["repair"]


@pytest.mark.slow  # the suite's INT8 variant (reduced_model) and three validations at 64 x 64
def test_an_int8_unit_over_target_on_the_gpu_goes_back_to_fp32_with_its_input_unquantized(reduced_model):
    """The INT8 variant's most sensitive unit broken on the played GPU: it is given back (its
    Q/DQ out of the variant's graph, FP32 weights), the second build holds, the others stay INT8."""
    from trufor_trt.export.repair import int8_graph_giving_back, repair, sensitivity_order

    model = ModelDir.open(reduced_model)
    fp32, int8 = onnx.load(model.variant_path("fp32")), onnx.load(model.variant_path("int8"))
    order = sensitivity_order(model.manifest["variants"]["int8"]["int8_plan"], "int8")
    engine = _PlayedEngine(model, fp32, order[0])

    def build_and_validate(given_back: list) -> dict:
        graph = int8_graph_giving_back(fp32, int8, given_back)
        return {**engine.validate(graph, _quantized_nodes(graph), INT8_TARGET), "quantized": _quantized_nodes(graph)}

    tries = repair(build_and_validate([]), build_and_validate, order, 3, print)
    assert len(order) >= 2 and [attempt["given_back"] for attempt in tries] == [[], [order[0]]]
    assert not tries[0]["validation"]["within_budget"] and tries[1]["validation"]["within_budget"]
    assert not tries[1]["quantized"] & engine.broken and tries[1]["quantized"] == tries[0]["quantized"] - engine.broken
    assert 0 < tries[1]["flops_at_512"]["int8"] < tries[0]["flops_at_512"]["int8"]
