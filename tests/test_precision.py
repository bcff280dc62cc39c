"""Precision variants: the FP16 lowering and its CPU simulation, the per-block plan, INT8 Q/DQ,
the manifest record, and `validate` against FP32."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graph surgery needs onnx (the export extra)")
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.precision.blocks import block_of, pixel_sum_chains
from trufor_trt.precision.fp16 import lower_to_fp16, upcast_fp16
from trufor_trt.precision.typing_check import precision_problems

from conftest import COCO, FP16_MAX_SHAPE, IMAGES_DIR, LARGE_IMAGES, run_onnx, shared_crop, small_onnx_model


def _tiny(weight):
    """y = Relu(x @ W) + 1, every tensor float32."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"], name="matmul"),
             helper.make_node("Relu", ["p"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "one"], ["y"], name="add")]
    return small_onnx_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(1, np.float32), "one")])


def _run(model, x):
    return run_onnx(model, x=x)


def test_lowering_types_the_chosen_nodes_and_keeps_float32_io():
    weight = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    lowered = lower_to_fp16(_tiny(weight), {"matmul", "relu"})
    assert lowered.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert lowered.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    half = [init for init in lowered.graph.initializer if init.data_type == TensorProto.FLOAT16]
    assert [init.name for init in half] == ["w/fp16"]
    casts = [node for node in lowered.graph.node if node.op_type == "Cast"]
    assert len(casts) == 2  # x into the FP16 island, r out of it


def test_upcast_rounds_exactly_like_float16_storage():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 4)).astype(np.float32)
    x = rng.normal(size=(1, 4)).astype(np.float32) * 3
    simulated = _run(upcast_fp16(lower_to_fp16(_tiny(weight), {"matmul", "relu"})), x)
    x16, w16 = x.astype(np.float16).astype(np.float32), weight.astype(np.float16).astype(np.float32)
    product = (x16 @ w16).astype(np.float16).astype(np.float32)
    expected = np.maximum(product, 0).astype(np.float16).astype(np.float32) + 1
    np.testing.assert_allclose(simulated, expected, rtol=1e-6)
    assert not np.allclose(simulated, _run(_tiny(weight), x), rtol=1e-7, atol=0)


def test_upcast_shows_float16_overflow():
    weight = np.full((4, 4), 1000.0, np.float32)
    simulated = _run(upcast_fp16(lower_to_fp16(_tiny(weight), {"matmul"})), np.full((1, 4), 30.0, np.float32))
    assert np.isinf(simulated).all()


def test_blocks_and_size_dependent_sums_are_found(model_seed0):
    graph = onnx.load(model_seed0 / "trufor_fp32.onnx", load_external_data=False)
    assert len(pixel_sum_chains(graph)) == 8  # 4 fusion stages x 2 directions
    blocks = {block_of(node.name) for node in graph.graph.node}
    assert {"noiseprint++", "rgb stream, stage 1", "noiseprint stream, stage 4", "fusion, stage 2",
            "localization decoder", "confidence decoder"} <= blocks


def test_type_check_passes_a_lowered_graph_and_names_every_departure_from_the_plan():
    weight = np.ones((4, 4), np.float32)
    lowered = lower_to_fp16(_tiny(weight), {"matmul", "relu"})
    assert precision_problems(lowered, {"matmul", "relu"}) == []
    assert precision_problems(_tiny(weight), set()) == []
    assert precision_problems(lowered, {"matmul"}) == [
        "node relu computes in float16 but the plan keeps it float32",
        "Cast r/lower reads float16 that no planned node wrote"]
    assert precision_problems(lowered, {"matmul", "relu", "add"}) == [
        "node add (Add) is planned float16 but computes in float32"]


def test_type_check_rejects_a_node_with_mixed_float_inputs():
    mixed = _tiny(np.ones((4, 4), np.float32))
    mixed.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(1, np.float16), "one"))
    problems = precision_problems(mixed, set())
    assert problems == ["node add (Add) mixes float16 and float32 inputs"]


def test_type_check_wants_float32_graph_inputs_and_outputs():
    model = _tiny(np.ones((4, 4), np.float32))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    assert "graph output y is float16, not float32" in precision_problems(model, set())


def _within(errors: dict, budget: dict) -> bool:
    return all(errors[name] <= limit for name, limit in budget.items())


def test_fp16_plan_puts_most_flops_in_fp16_within_budget_up_to_its_max_shape(reduced_model):
    from trufor_trt.export.measure import budget_share
    from trufor_trt.precision.budgets import FP16_BUDGET
    from trufor_trt.precision.kernel_models import KERNEL_MODELS, STRESS_MODEL

    fp16 = ModelDir.open(reduced_model).manifest["variants"]["fp16"]  # file hashes check out
    at_512, at_max = fp16["flops_by_precision"]
    assert at_512["size"] == "512x512" and at_512["network_share"]["fp16"] >= 0.70
    assert at_max["size"] == FP16_MAX_SHAPE and at_max["network_share"]["fp16"] >= 0.55
    by_size = fp16["deviation_vs_fp32"]["by_size"]
    assert set(by_size) == {"crops", FP16_MAX_SHAPE}
    for size, errors in by_size.items():
        assert set(errors["by_kernel_model"]) == set(KERNEL_MODELS), size
        for kernel, measured in errors["by_kernel_model"].items():
            assert _within(measured, FP16_BUDGET) and measured["flipped"] == 0, (size, kernel, measured)
    assert fp16["size_coverage"]["largest_measured"] == [1536, 2048] and "warning" not in fp16["size_coverage"]
    plan = fp16["fp16_plan"]
    assert plan["kernel_models"] == list(KERNEL_MODELS)
    forms, centers = plan["noiseprint_conv_forms"], plan["noiseprint_centers"]
    assert len(forms) >= 14 and set(forms.values()) <= {"centered", "centered_split"} and set(centers) == set(forms)
    assert all(np.array_equal(np.float16(center), np.float32(center)) for values in centers.values()
               for center in values)  # float16-exact centers
    assert {len(values) for values in centers.values()} <= {3, 64}
    layers = [entry for name, entry in plan["units"].items() if name.startswith("noiseprint++ layer")]
    assert sorted(forms.values()) == sorted(entry["form"] for entry in layers if entry["decision"] == "fp16")
    assert set(plan[f"stress_{STRESS_MODEL}"]["by_kernel_model"]) == {STRESS_MODEL}
    searched = plan["searched_at_half_size"]  # the full-size image, searched at half size first
    assert set(searched) == {"768x1024"} and budget_share(searched["768x1024"]) <= plan["plan_margin"]
    assert at_512["executed_gflop"]["fp32"] > at_512["network_gflop"]["fp32"]  # the centered offsets
    network_gflop = sum(at_512["network_gflop"].values())
    for name, entry in plan["units"].items():  # no unit spends budget out of proportion to its FLOPs
        if entry["decision"] == "fp16":
            assert entry["budget_share"] <= plan["max_cost_per_flop_share"] * entry["gflop_at_512"] / network_gflop
    assert plan["units"]["input normalisation"]["decision"].startswith("fp32: alone it uses")
    assert fp16["calibration"]["count"] == 3 and len(fp16["calibration"]["sha256"]) == 64


def test_int8_plan_compares_calibrations_and_keeps_the_target_at_every_size(reduced_model):
    from trufor_trt.calibration.int8 import CALIBRATION_METHODS
    from trufor_trt.precision.budgets import INT8_TARGET

    int8 = ModelDir.open(reduced_model).manifest["variants"]["int8"]
    plan = int8["int8_plan"]
    assert len(plan["methods_compared"]) == len(CALIBRATION_METHODS) + 1
    assert plan["quantization"]["method"] in CALIBRATION_METHODS
    for size, errors in int8["deviation_vs_fp32"]["by_size"].items():
        assert _within(errors, INT8_TARGET) and errors["flipped"] == 0, (size, errors)
    assert {entry["decision"].split(":")[0] for entry in plan["units"].values()} <= {"int8", "fp16", "given back"}
    layers = [entry["decision"] for name, entry in plan["units"].items() if name.startswith("noiseprint++ layer")]
    assert layers and set(layers) == {"fp16: Noiseprint++ stays centered FP16"}
    shares = int8["flops_by_precision"][0]["network_share"]
    assert shares["int8"] == 0 or any(entry["decision"] == "int8" for entry in plan["units"].values())
    assert abs(sum(shares.values()) - 1) < 1e-3


def test_int8_graph_has_symmetric_qdq_where_it_earned_int8(reduced_model):
    from trufor_trt.precision.flops import node_precisions

    graph = onnx.load(reduced_model / "trufor_int8.onnx")
    zero_points = [numpy_helper.to_array(init) for init in graph.graph.initializer
                   if init.name.endswith("zero_point")]
    assert all((point == 0).all() and point.dtype == np.int8 for point in zero_points)
    precisions = node_precisions(graph)
    int8 = ModelDir.open(reduced_model).manifest["variants"]["int8"]
    assert (int8["flops_by_precision"][0]["network_share"]["int8"] > 0) == ("int8" in precisions.values())
    assert "fp16" in precisions.values()  # the FP16 plan elsewhere


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_chain_parts_keep_the_variants_precision_plan(reduced_model, precision):
    """A chain cut from a reduced-precision graph keeps its nodes, types and Q/DQ: its Noiseprint++
    (banded) is the whole variant's exactly, and the chain's outputs stay within the precision's
    budget of the FP32 graph (its decoders run in FP32)."""
    from trufor_trt.engine.onnxruntime_runner import CpuSessions, create_session, run_session
    from trufor_trt.engine.preprocess import prepare_input
    from trufor_trt.export.chain_parts import CHAIN_PARTS, chain_part_graphs, cut_chain_parts
    from trufor_trt.export.graph_rules import tensorrt_shape_problems
    from trufor_trt.export.synthetic import synthetic_image
    from trufor_trt.export.verify import raw_deviation
    from trufor_trt.precision.budgets import FP16_BUDGET
    from trufor_trt.precision.kernel_models import SIMULATED_KERNEL_MODEL

    model = ModelDir.open(reduced_model)
    graphs = chain_part_graphs(model, precision)
    variant_half = _half_nodes(onnx.load(model.variant_path(precision)))
    for part in ("noiseprint", "encoder"):
        graph = onnx.load_from_string(graphs[part])
        kept_half = variant_half & {node.name for node in graph.graph.node}
        assert kept_half and _half_nodes(graph) == kept_half, part
        assert tensorrt_shape_problems(graph) == [] and precision_problems(graph, kept_half) == [], part
    simulated = upcast_fp16(onnx.load(model.variant_path(precision)), SIMULATED_KERNEL_MODEL)
    cut = cut_chain_parts(simulated)
    chain = CpuSessions.from_files({**graphs, "noiseprint": cut["noiseprint"].SerializeToString(),
                                    "encoder": cut["encoder"].SerializeToString()}, names=CHAIN_PARTS)
    prepared = prepare_input(synthetic_image(150, 190, seed=4))
    whole = run_session(create_session(simulated.SerializeToString()), prepared)
    fp32 = run_session(create_session(model.variant_path("fp32")), prepared)
    in_bands = chain.run(prepared, 40, 9)
    assert raw_deviation(in_bands, whole)["noiseprint"] < 1e-6
    errors = raw_deviation(in_bands, fp32)  # INT8 keeps Noiseprint++ in the FP16 plan's form
    assert errors["noiseprint"] <= FP16_BUDGET["np++"], errors


def _half_nodes(model) -> set:
    """The nodes (Casts aside) a graph computes in float16: those reading float16 tensors."""
    from trufor_trt.precision.fp16 import tensor_types

    types = tensor_types(model)
    return {node.name for node in model.graph.node if node.op_type != "Cast"
            and any(types.get(tensor) == TensorProto.FLOAT16 for tensor in node.input)}


def test_a_variant_measured_on_small_images_only_says_so():
    from trufor_trt.export.variants import _coverage

    assert "add full-size images" in _coverage(["256x256"], (2048, 2048))["warning"]
    assert "warning" not in _coverage(["256x256", "1536x2048"], (1536, 2048))
    assert "warning" not in _coverage(["256x256"], None)


def test_adding_a_variant_needs_calibration_images(tmp_path, checkpoint_seed0):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint_seed0), "--out",
                                      str(tmp_path / "m"), "--precision", "fp16"])
    assert result.exit_code == 2 and "--calib-images" in result.output


def _copy_shared_images(folder, keep) -> None:
    for path in sorted(IMAGES_DIR.rglob("*")):
        if path.is_file() and keep(path):
            target = folder / path.relative_to(IMAGES_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def _validation(model, images, folder, *precisions: str) -> tuple:
    """`validate` of the variants on the images: (variants, output, plot)."""
    report_path, plot = folder / "validate.json", folder / "deviation.png"
    result = CliRunner().invoke(app, ["validate", "--model", str(model), "--backend", "onnxruntime",
                                      *(part for precision in precisions for part in ("--precision", precision)),
                                      "--images", str(images), "--json", str(report_path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    document = json.loads(report_path.read_text())
    return document.get("variants", {precisions[0]: document}), result.output, plot


@pytest.fixture(scope="module")
def shared_validation(reduced_model, tmp_path_factory):
    """`validate` of the FP16 variant on the 52 shared images below 2 MP under both kernel
    models: (variants, output, plot). (INT8 on them, measured once: docs/precision.md; the suite validates
    INT8 on synthetic images, to stay within its time.)"""
    images = tmp_path_factory.mktemp("shared-images")
    _copy_shared_images(images, lambda path: path not in LARGE_IMAGES)
    return _validation(reduced_model, images, tmp_path_factory.mktemp("validation"), "fp16")


def test_validate_reports_each_kernel_model_per_size_with_flops_and_a_plot(shared_validation):
    from trufor_trt.precision.kernel_models import KERNEL_MODELS

    variants, output, plot = shared_validation
    assert "fp16 FLOPs at 512x512" in output and "fp16 (fused kernels) at 256x256" in output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in variants.values():
        assert set(variant["kernel_models"]) == set(KERNEL_MODELS)
        for kernel, report in variant["kernel_models"].items():
            assert report["kernel_model"] == kernel and report["overall"]["images"] == 52
            assert set(report["by_size"]) == {"256x256", "256x384"}
            assert report["flops_by_precision"][0]["size"] == "512x512"
            assert report["overall"]["noiseprint_max"] > 0
    fused, rounded = (variants["fp16"]["kernel_models"][kernel]["overall"] for kernel in ("fused", "rounded_output"))
    assert fused != rounded  # two simulations, not one reported twice


def test_fp16_keeps_every_decision_on_the_shared_images_under_both_kernel_models(shared_validation):
    for report in shared_validation[0]["fp16"]["kernel_models"].values():
        assert report["overall"]["decisions_flipped"] == 0


def test_fp16_stays_within_its_budget_on_every_shared_image(shared_validation):
    from trufor_trt.precision.budgets import FP16_BUDGET

    limits = {"map_max": FP16_BUDGET["map"], "conf_max": FP16_BUDGET["conf"],
              "score_error_max": FP16_BUDGET["score"], "noiseprint_max": FP16_BUDGET["np++"]}
    for kernel, report in shared_validation[0]["fp16"]["kernel_models"].items():
        overall = report["overall"]
        assert all(overall[key] <= limit for key, limit in limits.items()), (kernel, overall)


def _analyze_records(model, image_folder, out, *options) -> tuple:
    result = CliRunner().invoke(app, ["analyze", str(image_folder), "--out", str(out), "--model", str(model),
                                      "--backend", "onnxruntime", *options])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()], result.output


def test_the_verdict_guard_records_fp32_near_the_threshold_with_the_reduced_score_beside(reduced_model, tmp_path):
    """A margin that takes every score in (1 around 0.5): each FP16 result is recomputed in FP32,
    the FP32 outputs recorded (the .npz byte for byte what FP32 writes), the FP16 score beside;
    margin 0: the FP16 result recorded; by default the margin is said."""
    images = tmp_path / "images"
    for index in range(2):
        shared_crop(images / f"{index}.png", index)
    fp32, _ = _analyze_records(reduced_model, images, tmp_path / "fp32")
    fp16, _ = _analyze_records(reduced_model, images, tmp_path / "fp16", "--precision", "fp16", "--verdict-margin", "0")
    guarded, output = _analyze_records(reduced_model, images, tmp_path / "guarded", "--precision", "fp16",
                                       "--verdict-margin", "1", "--report")
    for ours, full, reduced in zip(guarded, fp32, fp16):
        assert reduced["precision"] == "fp16" and reduced["verdict_guard"] is None
        assert ours["precision"] == "fp32" and ours["score"] == full["score"]
        assert ours["provenance"] == full["provenance"]
        assert ours["verdict_guard"] == {"reduced_precision": "fp16", "reduced_score": reduced["score"], "margin": 1.0}
        npz = Path(ours["outputs"]["npz"]["file"])
        assert (tmp_path / "guarded" / npz).read_bytes() == (tmp_path / "fp32" / npz).read_bytes()
        assert "verdict_guard" in ours["times_ms"]
    assert "verdict guard: scores within 1 of 0.5" in output and "fp32: the verdict guard's; fp16 said" in output
    with open(tmp_path / "guarded" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["precision"], row["reduced_precision"]) for row in rows] == [("fp32", "fp16")] * 2
    assert "verdict guard: fp16 said" in (tmp_path / "guarded" / "report.html").read_text()
    _, default = _analyze_records(reduced_model, images, tmp_path / "default", "--precision", "fp16")
    assert "verdict guard: scores within 0.015 of 0.5" in default


def test_int8_validates_on_synthetic_images(reduced_model, tmp_path):
    report_path = tmp_path / "int8.json"
    result = CliRunner().invoke(app, ["validate", "--model", str(reduced_model), "--backend",
                                      "onnxruntime", "--precision", "int8", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    kernel_models = json.loads(report_path.read_text())["variants"]["int8"]["kernel_models"]
    assert set(kernel_models) == {"rounded_output", "fused"}
    for kernel, report in kernel_models.items():
        assert report["precision"] == "int8" and report["kernel_model"] == kernel and len(report["per_image"]) == 3
        assert report["overall"]["map_max"] > 0
    assert "int8 (rounded_output kernels) at 256x256" in result.output


def test_validate_counts_a_non_finite_output_as_a_flip():
    from trufor_trt.engine.postprocess import Analysis
    from trufor_trt.validate import compare

    ones = np.ones((2, 2), np.float32)
    truth = Analysis(ones * 0.2, ones, 0.3, -0.8, ones)
    broken = Analysis(ones * np.nan, ones, float("nan"), float("nan"), ones)
    report = compare("x", broken, truth)
    assert report.flipped and report.map_max == float("inf") and report.score_error == float("inf")


def test_int8_on_an_fp16_plan_from_before_centering_asks_for_fp16_again(tmp_path, model_seed0):
    """A folder whose FP16 plan has no Noiseprint++ centers (an older version's) is refused with
    what to do, before any calibration work."""
    from trufor_trt.errors import TruforError
    from trufor_trt.export.variants import add_precision_variant

    folder = shutil.copytree(model_seed0, tmp_path / "model")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = {**manifest["variants"]["fp32"], "fp16_plan": {"units": {}, "noiseprint_conv_forms": {}}}
    manifest["variants"]["fp16"] = old
    manifest_path.write_text(json.dumps(manifest))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    shutil.copy(sorted((COCO / "fake").glob("*.png"))[0], calibration)
    with pytest.raises(TruforError, match="predates centered Noiseprint"):
        add_precision_variant(folder, "int8", calibration)
