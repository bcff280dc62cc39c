"""The finer FP16 plan's parts: Noiseprint++ convolutions lowered plain or compensated, the
typing check's round trips, FLOPs counted per precision, and the size-coverage warning."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trufor_trt.precision.conv16 import lower_convolutions
from trufor_trt.precision.flops import flops_by_precision, node_flops, node_precisions
from trufor_trt.precision.fp16 import lower_to_fp16, upcast_fp16
from trufor_trt.precision.typing_check import precision_problems

from conftest import run_onnx, small_onnx_model


def _conv_graph(weight, bias):
    """y = Relu(Conv3x3(x, W) + b): one Noiseprint++-like layer, float32."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    channels = weight.shape[1]
    return small_onnx_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[0], 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])


def _run(model, x):
    return run_onnx(model, x=x)


@pytest.fixture(scope="module")
def cancelling_layer():
    """A layer like Noiseprint++'s worst: a large product cancelled by a large negative bias."""
    rng = np.random.default_rng(3)
    weight = rng.uniform(0.5, 1.5, size=(4, 16, 3, 3)).astype(np.float32)
    x = rng.uniform(3.0, 4.0, size=(1, 16, 8, 8)).astype(np.float32)
    exact = np.einsum("oikl,i->o", weight.astype(np.float64), x[0, :, 4, 4].astype(np.float64))
    bias = (-exact + 3.0).astype(np.float32) + np.float32(0.123)  # outputs of a few units
    model = _conv_graph(weight, bias)
    return model, x, _run(model, x)


def test_compensated_convolution_keeps_float32_accuracy_where_plain_float16_does_not(cancelling_layer):
    model, x, fp32 = cancelling_layer
    errors = {}
    for form in ("fp16", "compensated"):
        lowered, half = lower_convolutions(model, {"conv": form})
        assert precision_problems(lowered, half) == [], form
        errors[form] = float(np.abs(_run(upcast_fp16(lowered), x) - fp32).max())
    naive = float(np.abs(_run(upcast_fp16(lower_to_fp16(model, {"conv"})), x) - fp32).max())
    # Plain float16 rounds the ~500-sized bias and product (steps of 0.25-0.5); the bias
    # remainder in float32 already helps; splitting input and weights leaves the output's rounding.
    assert naive > 0.05
    assert errors["fp16"] < naive
    assert errors["compensated"] < 0.01 < errors["fp16"]


def test_compensated_form_runs_three_float16_products_per_product(cancelling_layer):
    model, _, _ = cancelling_layer
    lowered, half = lower_convolutions(model, {"conv": "compensated"})
    assert half == {"conv", "conv/x_split"}
    weights = {init.name: init for init in lowered.graph.initializer}
    assert weights["conv/w16"].data_type == TensorProto.FLOAT16 and list(weights["conv/w16"].dims) == [4, 48, 3, 3]
    assert node_precisions(lowered)["conv"] == "fp16"
    assert node_flops(lowered, 8, 8)["conv"] == 3 * node_flops(model, 8, 8)["conv"]


def test_type_check_accepts_a_round_trip_but_not_float16_read_outside_the_plan(cancelling_layer):
    model, _, _ = cancelling_layer
    lowered, half = lower_convolutions(model, {"conv": "compensated"})
    assert precision_problems(lowered, half) == []
    # The split's float16 input read by a float32 node: no longer a round trip, now a leak.
    leaky = onnx.ModelProto.FromString(lowered.SerializeToString())
    leaky.graph.node.append(helper.make_node("Relu", ["conv/x_rounded"], ["leak"], name="leak"))
    assert any("leak" in problem for problem in precision_problems(leaky, half))
    assert any("plan keeps it float32" in problem or "unplanned" in problem
               for problem in precision_problems(lowered, {"conv"}))


def test_flops_by_precision_splits_network_and_executed_counts(cancelling_layer):
    model, _, _ = cancelling_layer
    lowered, _ = lower_convolutions(model, {"conv": "compensated"})
    record = flops_by_precision(model, lowered, 8, 8)
    layer = 2 * 4 * 8 * 8 * 16 * 9
    assert record["network_gflop"]["fp16"] == round(layer / 1e9, 2)
    assert record["network_share"] == {"fp32": 0.0, "fp16": 1.0, "int8": 0.0}
    assert node_flops(model, 8, 8) == {"conv": layer}


@pytest.mark.shared
def test_graph_flops_agree_with_the_architecture_count(model_seed0):
    """Two independent counts: shapes inferred from the exported graph, and the arithmetic of
    benchmarks/flops.py written from the architecture."""
    from trufor_trt.benchmarks.flops import network_flops

    graph = onnx.load(model_seed0 / "trufor_fp32.onnx")
    for height, width in ((512, 512), (1536, 2048)):
        counted = node_flops(graph, height, width)
        expected = network_flops(height, width, folded_decoders=True)
        noiseprint = sum(flops for name, flops in counted.items() if name.startswith("/dncnn/"))
        assert noiseprint == expected["noiseprint"]
        assert sum(counted.values()) == pytest.approx(expected["total"], rel=2e-3)


def test_build_warns_when_the_profile_admits_images_larger_than_measured():
    from trufor_trt.engine.tensorrt_plan import Profile
    from trufor_trt.export.tensorrt_build import coverage_warning

    measured = {"precision": "fp16", "size_coverage": {"largest_measured": [1536, 2048]}}
    assert coverage_warning(measured, Profile((32, 32), (1024, 1024), (1536, 2048))) == ""
    warning = coverage_warning(measured, Profile((32, 32), (1024, 1024), (2048, 2048)))
    assert "up to 1536x2048" in warning and "--max-shape 2048x2048" in warning
    assert coverage_warning({"precision": "fp32"}, Profile((32, 32), (64, 64), (4096, 4096))) == ""


def test_a_lowered_convolution_and_a_lowered_reader_of_its_output_combine(cancelling_layer):
    """Noiseprint++'s last convolution writes `noiseprint`, which the FP16 stream reads: the two
    lowerings must not name a tensor twice."""
    model, x, fp32 = cancelling_layer
    lowered, half = lower_convolutions(model, {"conv": "fp16"})
    both = lower_to_fp16(lowered, {"relu"})
    assert precision_problems(both, half | {"relu"}) == []
    assert np.abs(_run(upcast_fp16(both), x) - fp32).max() < 1.0


def test_int8_subset_rewires_the_other_products_to_float32(tmp_path):
    """Quantize two products once, keep one in INT8: the other reads its float input and the
    FP32 weight again, and computes exactly as the FP32 graph."""
    from trufor_trt.calibration.int8 import keep_int8_only, quantize_nodes

    rng = np.random.default_rng(5)
    w1, w2 = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["image", "w1"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")]
    fp32 = small_onnx_model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [4, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                            [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(fp32, tmp_path / "fp32.onnx")
    inputs = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(4)]
    both = quantize_nodes(tmp_path / "fp32.onnx", inputs, {"first", "second"}, "MinMax", True, tmp_path)
    both.ir_version = 10
    only_first = keep_int8_only(both, fp32, {"first"})
    from trufor_trt.precision.flops import node_precisions

    assert node_precisions(both) == {"first": "int8", "second": "int8"}
    assert node_precisions(only_first) == {"first": "int8", "second": "fp32"}
    second = next(node for node in only_first.graph.node if node.name == "second")
    assert second.input[1] == "w2"  # the FP32 weight, restored

    def run(model, x):
        return run_onnx(model, image=x)

    first_int8 = keep_int8_only(both, fp32, {"first"})
    relu_in = run(first_int8, inputs[0])
    assert not np.allclose(relu_in, run(fp32, inputs[0]), rtol=0, atol=1e-6)  # the first is INT8
    none = keep_int8_only(both, fp32, set())
    np.testing.assert_allclose(run(none, inputs[0]), run(fp32, inputs[0]), rtol=1e-6)
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in none.graph.node)


@pytest.mark.shared
def test_calibration_keeps_the_largest_images_whole_up_to_the_max_shape(tmp_path):
    import shutil

    from trufor_trt.calibration.images import CROP_SIDE, load_calibration_set

    from conftest import IMAGES_DIR

    for source in [*sorted((IMAGES_DIR / "cocoglide_sample" / "fake").glob("*.png"))[:2],
                   IMAGES_DIR / "tampered1.png"]:
        shutil.copy(source, tmp_path)
    crops, whole, record = load_calibration_set(tmp_path, max_shape=(1024, 2048))
    assert [x.shape[2:] for x in crops] == [(CROP_SIDE, CROP_SIDE)] * 3
    assert [x.shape[2:] for x in whole] == [(1024, 2048)]  # 1536x2048, centre-cropped to the max shape
    assert record["full_size_files"] == ["tampered1.png"] and record["sizes"] == ["256x256", "1024x2048"]
    _, none, without = load_calibration_set(tmp_path)
    assert none == [] and without["full_size_files"] == []
