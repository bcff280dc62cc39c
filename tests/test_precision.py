"""Precision variants: the FP16 lowering and its CPU simulation, the per-block plan, INT8 Q/DQ,
the manifest record, and `validate` against FP32."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.precision.blocks import block_of, pixel_sum_chains
from trufor_trt.precision.fp16 import lower_to_fp16, upcast_fp16
from trufor_trt.precision.typing_check import precision_problems

from conftest import IMAGES_DIR

COCO = IMAGES_DIR / "cocoglide_sample"


def _tiny(weight):
    """y = Relu(x @ W) + 1, every tensor float32."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"], name="matmul"),
             helper.make_node("Relu", ["p"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "one"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(1, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


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


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for source in sorted((COCO / "fake").glob("*.png"))[:2]:
        shutil.copy(source, folder)
    return folder


@pytest.fixture(scope="module")
def reduced_model(tmp_path_factory, model_seed0, checkpoint_seed0, calibration_folder):
    """The seed-0 model folder with FP16 and INT8 variants added through the CLI."""
    folder = shutil.copytree(model_seed0, tmp_path_factory.mktemp("reduced") / "model")
    for precision in ("fp16", "int8"):
        result = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint_seed0), "--out",
                                          str(folder), "--precision", precision,
                                          "--calib-images", str(calibration_folder)])
        assert result.exit_code == 0, result.output
    return folder


def test_variants_are_recorded_in_the_manifest(reduced_model):
    model = ModelDir.open(reduced_model)  # hashes of the new files check out
    fp16, int8 = model.manifest["variants"]["fp16"], model.manifest["variants"]["int8"]
    for entry in (fp16, int8):
        assert entry["calibration"]["count"] == 2 and len(entry["calibration"]["sha256"]) == 64
        assert set(entry["deviation_vs_fp32"]["max_abs"]) == {"map", "conf", "score", "np++"}
    blocks = fp16["fp16_plan"]["blocks"]
    assert blocks["noiseprint++"]["decision"].startswith("fp32")
    assert sum(block["decision"] == "fp16" for block in blocks.values()) >= 10
    assert all(error <= budget for error, budget in zip(
        fp16["deviation_vs_fp32"]["max_abs"].values(), fp16["fp16_plan"]["budget_max_abs"].values()))
    assert int8["quantization"]["weights"].startswith("int8, symmetric, per output channel")


def test_int8_graph_has_symmetric_qdq_and_fp16_attention(reduced_model):
    graph = onnx.load(reduced_model / "trufor_int8.onnx")
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [numpy_helper.to_array(init) for init in graph.graph.initializer
                   if init.name.endswith("zero_point")]
    assert zero_points and all((point == 0).all() and point.dtype == np.int8 for point in zero_points)
    softmax_outputs = {node.output[0] for node in graph.graph.node if node.op_type == "Softmax"}
    assert any(name.endswith("/fp16") for name in softmax_outputs)  # attention computes in FP16


def test_adding_a_variant_needs_calibration_images(tmp_path, checkpoint_seed0):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint_seed0), "--out",
                                      str(tmp_path / "m"), "--precision", "fp16"])
    assert result.exit_code == 2 and "--calib-images" in result.output


def test_fp16_keeps_every_decision_on_the_shared_images(reduced_model, tmp_path):
    report_path = tmp_path / "fp16.json"
    result = CliRunner().invoke(app, ["validate", "--model", str(reduced_model), "--backend",
                                      "onnxruntime", "--precision", "fp16", "--images", str(COCO),
                                      "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["overall"]["images"] == 50 and report["overall"]["decisions_flipped"] == 0
    assert np.isfinite(report["overall"]["map_max"]) and report["overall"]["map_max"] < 2e-2


def test_int8_validates_and_reports(reduced_model, tmp_path):
    report_path = tmp_path / "int8.json"
    result = CliRunner().invoke(app, ["validate", "--model", str(reduced_model), "--backend",
                                      "onnxruntime", "--precision", "int8", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["precision"] == "int8" and len(report["per_image"]) == 3
    assert report["overall"]["map_max"] > 0 and "overall" in result.output


def test_validate_counts_a_non_finite_output_as_a_flip():
    from trufor_trt.engine.postprocess import Analysis
    from trufor_trt.validate import compare

    ones = np.ones((2, 2), np.float32)
    truth = Analysis(ones * 0.2, ones, 0.3, -0.8, ones)
    broken = Analysis(ones * np.nan, ones, float("nan"), float("nan"), ones)
    report = compare("x", broken, truth)
    assert report.flipped and report.map_max == float("inf") and report.score_error == float("inf")
