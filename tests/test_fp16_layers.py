"""The finer FP16 plan's parts: Noiseprint++ convolutions lowered centered, the kernel models
of the CPU simulation, the typing check's round trips, FLOPs counted per precision, and the
size-coverage warning."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graph surgery needs onnx (the export extra)")
from onnx import TensorProto, helper, numpy_helper

from trufor_trt.precision.budgets import FP16_BUDGET
from trufor_trt.precision.conv16 import lower_convolutions
from trufor_trt.precision.flops import flops_by_precision, node_flops, node_precisions
from trufor_trt.precision.fp16 import lower_to_fp16, upcast_fp16
from trufor_trt.precision.kernel_models import KERNEL_MODELS, STRESS_MODEL
from trufor_trt.precision.typing_check import precision_problems
from trufor_trt.precision.weight_store import WeightStore

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


def _centers_of(x):
    return {"conv": x.mean(axis=(0, 2, 3)).astype(np.float16).astype(np.float32)}


def test_centered_convolution_holds_under_both_kernel_models_where_plain_float16_does_not(cancelling_layer):
    model, x, fp32 = cancelling_layer
    lowered, half = lower_convolutions(model, {"conv": "centered"}, _centers_of(x))
    assert precision_problems(lowered, half) == [] and half == {"conv"}
    plain = lower_to_fp16(model, {"conv"})
    errors = {kernel: float(np.abs(_run(upcast_fp16(lowered, kernel), x) - fp32).max()) for kernel in KERNEL_MODELS}
    naive = {kernel: float(np.abs(_run(upcast_fp16(plain, kernel), x) - fp32).max()) for kernel in KERNEL_MODELS}
    # Plain float16 rounds the ~500-sized input product (and, with cuDNN's order, the product
    # before the bias cancels it) at steps of 0.25-0.5; centered, it sums numbers below 1.
    assert min(naive.values()) > 0.05
    assert max(errors.values()) < 0.01


def test_the_kernel_models_differ_where_the_bias_cancels_the_product(cancelling_layer):
    """Rounding the product before the bias (cuDNN's order) costs more than a fused epilogue."""
    model, x, fp32 = cancelling_layer
    plain = lower_to_fp16(model, {"conv"})
    fused, rounded = (float(np.abs(_run(upcast_fp16(plain, kernel), x) - fp32).max())
                      for kernel in ("fused", "rounded_output"))
    assert rounded > 1.5 * fused


def test_centered_form_is_exact_at_the_borders_with_exact_arithmetic(cancelling_layer):
    """The offset convolution of the all-ones image carries the zero padding: with the float16
    storage taken away (every Cast to float16 made a float32 no-op) the form equals the layer."""
    model, x, fp32 = cancelling_layer
    lowered, _ = lower_convolutions(model, {"conv": "centered"}, {"conv": np.full(16, 3.5, np.float32)})
    exact = onnx.ModelProto.FromString(lowered.SerializeToString())
    for init in exact.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    weights = {init.name: init for init in exact.graph.initializer}
    weights["conv/w16"].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(
        next(init for init in model.graph.initializer if init.name == "w")), "conv/w16"))
    for node in exact.graph.node:
        if node.op_type == "Cast":
            node.attribute[0].i = TensorProto.FLOAT
    assert np.abs(_run(exact, x) - fp32).max() < 1e-3  # float32 sums of ~500-sized terms
    assert np.abs(_run(exact, x)[..., 0, :] - fp32[..., 0, :]).max() < 1e-3  # the padded border row


def test_centered_form_takes_the_ones_image_from_the_input_at_run_time(cancelling_layer):
    """One graph, any image size: the all-ones image is shaped from the input, not baked in."""
    model, x, _ = cancelling_layer
    lowered, _ = lower_convolutions(model, {"conv": "centered"}, _centers_of(x))
    ops = {node.op_type for node in lowered.graph.node}
    assert {"Shape", "ConstantOfShape"} <= ops
    lowered.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    lowered.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "height"
    taller = np.concatenate([x, x], axis=2)
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    reference.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    reference.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "height"
    assert np.abs(_run(upcast_fp16(lowered), taller) - _run(reference, taller)).max() < 0.01


def test_split_form_takes_the_input_rounding_out_at_twice_the_products(cancelling_layer):
    """Centered values spread wide (a center far from some pixels): the split form's hi + lo
    input keeps what float16 rounding of the centered input loses (seen with the fused kernel,
    whose output is not rounded: rounded, the large product's rounding would hide it)."""
    model, x, fp32 = cancelling_layer
    far = {"conv": np.full(16, 1.0, np.float32)}  # inputs at 3-4: centered values of 2-3
    errors = {}
    for form in ("centered", "centered_split"):
        lowered, half = lower_convolutions(model, {"conv": form}, far)
        assert precision_problems(lowered, half) == [], form
        errors[form] = float(np.abs(_run(upcast_fp16(lowered, "fused"), x) - fp32).max())
    assert errors["centered_split"] < errors["centered"] / 2
    lowered, half = lower_convolutions(model, {"conv": "centered_split"}, far)
    assert half == {"conv", "conv/x_split"}
    weights = {init.name: init for init in lowered.graph.initializer}
    assert list(weights["conv/w16"].dims) == [4, 32, 3, 3]  # [W, W] over [hi, lo]: twice the products


def _conv3x3_float64(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """A 3x3 convolution with zero padding 1, in float64 (N=1, C x H x W)."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    height, width = x.shape[1:]
    return sum(np.einsum("oc,chw->ohw", weight[:, :, row, column].astype(np.float64),
                         padded[:, row:row + height, column:column + width])
               for row in range(3) for column in range(3))


def test_split_form_is_simulated_as_one_convolution_over_hi_plus_lo(cancelling_layer):
    """[hi, lo] against [W, W] is the products of hi + lo with W, and hi + lo is exact in
    float32: under both kernel models the simulation convolves that sum (half the products) and
    equals float64 arithmetic on the same float16 values; float16 accumulation, whose partial
    sums run over the 2 x 16 channels, keeps the concatenation."""
    model, x, _ = cancelling_layer
    center = np.full(16, 1.0, np.float32)
    lowered, _ = lower_convolutions(model, {"conv": "centered_split"}, {"conv": center})
    weight = numpy_helper.to_array(next(init for init in model.graph.initializer if init.name == "w"))
    bias = numpy_helper.to_array(next(init for init in model.graph.initializer if init.name == "b"))
    centered = x[0] - center[:, None, None]
    hi = centered.astype(np.float16).astype(np.float32)
    lo = (centered - hi).astype(np.float16).astype(np.float32)
    weight16 = weight.astype(np.float16)
    offset = _conv3x3_float64(np.ones((16, 8, 8)) * center[:, None, None], weight) + bias[:, None, None]
    expected = np.maximum(_conv3x3_float64(hi, weight16) + _conv3x3_float64(lo, weight16) + offset, 0)
    simulated = upcast_fp16(lowered, "fused")
    weights = {init.name: init for init in simulated.graph.initializer}
    conv = next(node for node in simulated.graph.node if node.name == "conv")
    assert list(weights[conv.input[1]].dims) == [4, 16, 3, 3]
    assert np.abs(_run(simulated, x)[0] - expected).max() < 2e-4  # the offset's float32 sums of ~500
    assert np.abs(_run(simulated, x)[0] - np.maximum(_conv3x3_float64(hi, weight16) + offset, 0)).max() > 1e-3
    rounded = upcast_fp16(lowered, "rounded_output")
    assert any(node.name == "conv/hi_plus_lo" for node in rounded.graph.node)
    assert not any(node.name == "conv/hi_plus_lo" for node in upcast_fp16(lowered, STRESS_MODEL).graph.node)


def test_centered_form_needs_a_center_per_input_channel(cancelling_layer):
    model, _, _ = cancelling_layer
    with pytest.raises(ValueError, match="one center per input channel"):
        lower_convolutions(model, {"conv": "centered"}, {"conv": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unknown convolution forms"):
        lower_convolutions(model, {"conv": "compensated"}, {})


def test_float16_accumulation_stress_model_rounds_partial_sums(cancelling_layer):
    """Each 16 input channels' partial sum rounded: on a 16-channel layer that is the one sum,
    the rounded output model; on 64 channels the extra roundings move the output further."""
    model, x, _ = cancelling_layer
    plain = lower_to_fp16(model, {"conv"})
    assert np.array_equal(_run(upcast_fp16(plain, STRESS_MODEL), x), _run(upcast_fp16(plain, "rounded_output"), x))
    rng = np.random.default_rng(5)
    wide = _conv_graph(rng.normal(size=(8, 64, 3, 3)).astype(np.float32), np.zeros(8, np.float32))
    wide_x = rng.normal(size=(1, 64, 8, 8)).astype(np.float32)
    exact, wide_plain = _run(wide, wide_x), lower_to_fp16(wide, {"conv"})
    stressed, rounded = (float(np.abs(_run(upcast_fp16(wide_plain, kernel), wide_x) - exact).mean())
                         for kernel in (STRESS_MODEL, "rounded_output"))
    assert stressed > 1.2 * rounded


def test_type_check_accepts_a_round_trip_but_not_float16_read_outside_the_plan(cancelling_layer):
    model, x, _ = cancelling_layer
    lowered, half = lower_convolutions(model, {"conv": "centered"}, _centers_of(x))
    assert precision_problems(lowered, half) == []
    # The centered input read by a float32 node: a leak of float16 out of the plan.
    leaky = onnx.ModelProto.FromString(lowered.SerializeToString())
    leaky.graph.node.append(helper.make_node("Relu", ["conv/x_centered16"], ["leak"], name="leak"))
    assert any("leak" in problem for problem in precision_problems(leaky, half))
    assert any("plan keeps it float32" in problem for problem in precision_problems(lowered, set()))
    rounded = helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="x16")
    back = helper.make_node("Cast", ["x16"], ["x_back"], to=TensorProto.FLOAT, name="x_back")
    trip = onnx.ModelProto.FromString(lowered.SerializeToString())
    trip.graph.node.extend([rounded, back])
    assert precision_problems(trip, half) == []


def test_flops_by_precision_splits_network_and_executed_counts():
    """A first layer (3 input channels, as the shape count feeds an image): in float16 the whole
    network count, the offset's one-channel convolution executed in float32 besides."""
    weight = np.random.default_rng(0).normal(size=(64, 3, 3, 3)).astype(np.float32)
    model = _conv_graph(weight, np.zeros(64, np.float32))
    lowered, _ = lower_convolutions(model, {"conv": "centered"}, {"conv": np.full(3, 0.5, np.float32)})
    layer = 2 * 64 * 512 * 512 * 3 * 9
    assert node_flops(model, 512, 512) == {"conv": layer}
    assert node_flops(lowered, 512, 512) == {"conv": layer, "conv/offset": layer // 3}
    record = flops_by_precision(model, lowered, 512, 512)
    assert record["network_gflop"]["fp16"] == round(layer / 1e9, 2)
    assert record["network_share"] == {"fp32": 0.0, "fp16": 1.0, "int8": 0.0}
    assert record["executed_gflop"]["fp32"] == round(layer / 3 / 1e9, 2)


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
    lowered, half = lower_convolutions(model, {"conv": "centered"}, _centers_of(x))
    both = lower_to_fp16(lowered, {"relu"})
    assert precision_problems(both, half | {"relu"}) == []
    assert np.abs(_run(upcast_fp16(both), x) - fp32).max() < 1.0


def test_int8_subset_rewires_the_other_products_to_float32(tmp_path, caplog, capsys):
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
    both = quantize_nodes(tmp_path / "fp32.onnx", [{"image": x} for x in inputs], {"first", "second"}, "Percentile",
                          True, tmp_path)
    both.ir_version = 10
    # The quantizer's advice to pre-process (which would rename the nodes chosen by name) and its
    # calibrators' progress are not passed on.
    assert not [record for record in caplog.records if "pre-processing" in record.getMessage()]
    assert "Collecting tensor data" not in capsys.readouterr().out
    only_first = keep_int8_only(both, fp32, {"first"})
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


def test_a_product_out_of_int8_reads_the_unquantized_input_an_int8_product_shares(tmp_path):
    """Two products read one activation; quantized, they share its Q/DQ pair. With only one kept
    in INT8 (a unit given back, or not earned), the other reads the activation itself: it
    computes exactly as in the FP32 graph."""
    from trufor_trt.calibration.int8 import keep_int8_only, quantize_nodes

    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["image", "w1"], ["left_out"], name="left"),
             helper.make_node("MatMul", ["image", "w2"], ["right_out"], name="right")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 8]) for name in ("right_out", "left_out")]
    fp32 = small_onnx_model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [4, 8])], outputs,
                            [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), name)
                             for name in ("w1", "w2")])
    onnx.save(fp32, tmp_path / "fp32.onnx")
    inputs = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(4)]
    both = quantize_nodes(tmp_path / "fp32.onnx", [{"image": x} for x in inputs], {"left", "right"}, "MinMax",
                          True, tmp_path)
    both.ir_version = 10
    left_only = keep_int8_only(both, fp32, {"left"})
    assert next(node for node in left_only.graph.node if node.name == "right").input[:] == ["image", "w2"]
    np.testing.assert_array_equal(run_onnx(left_only, image=inputs[0]), run_onnx(fp32, image=inputs[0]))


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
    _, none, within_crops = load_calibration_set(tmp_path, max_shape=(CROP_SIDE, CROP_SIDE))
    assert none == [] and within_crops["sizes"] == ["256x256"]  # not the crops measured twice


def test_give_back_only_touches_units_that_can_move_the_output_over_budget():
    """np++ over budget: only Noiseprint++ layers can lower it (nothing after it moves it), so a
    costlier block stays; the map over budget: the costliest unit per FLOP goes."""
    from trufor_trt.export.fp16_search import give_back_until_within

    earned = {"noiseprint++ layer 3": 1, "noiseprint++ layer 4": 1, "localization decoder": 1}
    cost = {"noiseprint++ layer 3": 1.0, "noiseprint++ layer 4": 2.0, "localization decoder": 9.0}
    decisions = {name: {} for name in earned}
    answers = iter([(1.3, "np++"), (1.1, "map"), (0.9, "map")])
    give_back_until_within(earned, cost, lambda units, limit: next(answers), 1.0, decisions, "here",
                           on_step=lambda message: None)
    assert list(earned) == ["noiseprint++ layer 3"]
    assert decisions["noiseprint++ layer 4"]["decision"].startswith("given back: the units together used 130%")
    assert decisions["localization decoder"]["decision"].startswith("given back: the units together used 110%")


def test_at_full_size_growing_units_go_first_attention_first_several_at_once():
    from trufor_trt.export.fp16_search import give_back_until_within

    names = ["rgb stream, stage 1", "rgb stream, stage 1, attention scores", "fusion, stage 2",
             "fusion, stage 2, attention scores", "confidence decoder"]
    earned = dict.fromkeys(names, 1)
    cost = dict(zip(names, (5.0, 1.0, 4.0, 2.0, 9.0)))
    answers = iter([(2.0, "map"), (0.5, "map")])
    give_back_until_within(earned, cost, lambda units, limit: next(answers), 1.0, {name: {} for name in names},
                           "at full size", on_step=lambda message: None, full_size=True)
    # 4 growing units at 200% of the budget: half of them go, the attention ones, costliest first.
    assert set(earned) == {"rgb stream, stage 1", "fusion, stage 2", "confidence decoder"}


def test_units_given_back_at_full_size_are_tried_again_the_most_flops_first_but_the_one_needed():
    from trufor_trt.export import fp16_search

    flops = {"rgb stream, stage 3": 15.4, "noiseprint stream, stage 3": 15.3, "rgb stream, stage 4": 5.6,
             "fusion, stage 4": 2.6}
    steps = [{"fusion, stage 4": 2, "rgb stream, stage 4": 3, "noiseprint stream, stage 3": 4},
             {"rgb stream, stage 3": 5}]  # its going alone brought the units within: needed

    def take_back(answers: list, tries: int) -> tuple:
        decisions = {name: {"gflop_at_512": value} for name, value in flops.items()}
        earned, tried, replies = {"confidence decoder": 1}, [], iter(answers)

        def share_of(units, limit):
            tried.append(sorted(units))
            return next(replies)

        fp16_search.take_back(earned, steps, share_of, 1.0, decisions, "at 1536x2048", lambda message: None,
                              tries=tries)
        return earned, tried, decisions

    earned, tried, decisions = take_back([(0.9, "map")], fp16_search.TAKE_BACK_TRIES)
    assert fp16_search.TAKE_BACK_TRIES == 1 and tried == [["confidence decoder", "noiseprint stream, stage 3"]]
    assert earned == {"confidence decoder": 1, "noiseprint stream, stage 3": 4}
    assert decisions["noiseprint stream, stage 3"]["decision"] == "fp16"
    earned, tried, decisions = take_back([(1.2, "map"), (0.9, "map")], 2)
    assert tried == [["confidence decoder", "noiseprint stream, stage 3"],  # over: given back again
                     ["confidence decoder", "rgb stream, stage 4"]]  # the next most FLOPs, held
    assert earned == {"confidence decoder": 1, "rgb stream, stage 4": 3}
    assert "decision" not in decisions["noiseprint stream, stage 3"]  # its give-back reason stays as it was


def test_a_unit_spending_budget_out_of_proportion_to_its_flops_stays_fp32():
    """The input normalisation has no FLOPs: 21% of the budget alone is within half, and still
    not worth it (it moved airplane_44652's score 2.7e-3 where the crops showed 2e-4)."""
    from trufor_trt.export.fp16_plan import MAX_COST_PER_FLOP_SHARE, Unit, _earn_alone

    units = [Unit("input normalisation", frozenset({"/Div"})), Unit("rgb stream, stage 3", frozenset({"/mm"})),
             Unit("fusion, stage 1", frozenset({"/conv1"})), Unit("fusion, stage 2", frozenset({"/conv2"}))]
    flops = {"/mm": 40e9, "/conv1": 0.5e9, "/conv2": 0.5e9, "/other": 59e9}  # shares 40%, 0.5%, 0.5%
    assert MAX_COST_PER_FLOP_SHARE * 0.005 == 0.25  # fusion stages 1 and 2 may use a quarter of the budget
    share = {"/Div": 0.21, "/mm": 0.3, "/conv1": 0.3, "/conv2": 0.24}  # all within half the budget

    def block_measure(nodes, forms, stop_above):
        return {"map": share[next(iter(nodes))] * FP16_BUDGET["map"], "conf": 0.0, "score": 0.0, "np++": 0.0,
                "flipped": 0}

    decisions = {}
    earned, _ = _earn_alone(units, dict.fromkeys([unit.name for unit in units], 1.0), flops,
                            {"block": block_measure}, decisions, on_step=lambda message: None)
    assert set(earned) == {"rgb stream, stage 3", "fusion, stage 2"}
    assert decisions["input normalisation"]["decision"] == ("fp32: alone it uses 21% of the FP16 budget "
                                                            "for 0.00% of the FLOPs")
    assert decisions["fusion, stage 1"]["decision"] == ("fp32: alone it uses 30% of the FP16 budget "
                                                        "for 0.50% of the FLOPs")


# np++ deviations twice and a quarter of its FP16 budget.
PAST_BUDGET, WITHIN_BUDGET = 2 * FP16_BUDGET["np++"], FP16_BUDGET["np++"] / 4


def test_a_trial_past_the_budget_under_one_kernel_model_skips_the_other():
    from trufor_trt.export.measure import under_kernel_models

    measured = []

    def measure(kernel):
        measured.append(kernel)
        return {"np++": PAST_BUDGET if kernel == KERNEL_MODELS[0] else WITHIN_BUDGET}

    result = under_kernel_models(measure, stop_above=1.0)
    assert measured == [KERNEL_MODELS[0]] and result["np++"] == PAST_BUDGET
    both = under_kernel_models(measure)
    assert set(both["by_kernel_model"]) == set(KERNEL_MODELS) and both["np++"] == PAST_BUDGET
    measured.clear()
    same = under_kernel_models(measure, differ=False)
    assert measured == [KERNEL_MODELS[0]] and same["by_kernel_model"][KERNEL_MODELS[1]]["np++"] == PAST_BUDGET


def test_the_kernel_model_that_used_the_most_budget_is_measured_first_next_time():
    """After a trial under both, the worse goes first: a candidate past its limit there costs
    one run. A trial that stopped at the first keeps the order."""
    from trufor_trt.export.measure import KernelOrder, budget_share, under_kernel_models

    order, measured = KernelOrder(), []
    second = KERNEL_MODELS[1]

    def measure(kernel):
        measured.append(kernel)
        return {"np++": PAST_BUDGET if kernel == second else WITHIN_BUDGET}

    order.note(under_kernel_models(measure, order.kernels)["by_kernel_model"], budget_share)
    assert measured == list(KERNEL_MODELS) and order.kernels == [second, KERNEL_MODELS[0]]
    measured.clear()
    order.note(under_kernel_models(measure, order.kernels, stop_above=1.0)["by_kernel_model"], budget_share)
    assert measured == [second] and order.kernels == [second, KERNEL_MODELS[0]]


def test_a_full_size_image_is_searched_on_its_half_size_centre_crop_first():
    """The half-size search (within the plan's margin, recorded apart), then the full size within
    the budget; an image below HALF_SIZE_SEARCH_FROM goes to the full size directly."""
    from trufor_trt.export.fp16_plan import HALF_SIZE_SEARCH_FROM, PLAN_MARGIN, Fp16Plan, full_size_steps

    plan = Fp16Plan()
    large = np.arange(3 * 600 * 800, dtype=np.float32).reshape(1, 3, 600, 800)
    (half, half_limit, half_record), (full, full_limit, full_record) = full_size_steps(large, plan)
    assert np.array_equal(half, large[:, :, 150:450, 200:600]) and half.flags.c_contiguous
    assert (half_limit, full_limit) == (PLAN_MARGIN, 1.0)
    assert half_record is plan.searched_at and full is large and full_record is plan.deviation_by_size
    small = large[:, :, :HALF_SIZE_SEARCH_FROM - 1]
    assert [(image.shape, limit) for image, limit, _ in full_size_steps(small, plan)] == [(small.shape, 1.0)]


def test_full_size_images_of_one_size_are_each_recorded_not_the_last_over_the_first():
    from types import SimpleNamespace

    from trufor_trt.export.fp16_plan import Fp16Plan, _check_full_size

    plan, unit = Fp16Plan(), SimpleNamespace(nodes={"a node"}, conv=None)
    earned, cost = {"a unit": (unit, "plain")}, {"a unit": 1.0}

    def measure_on(image):  # each image's deviation: its first pixel, a thousandth of it
        return lambda half, forms, stop_above: {"map": float(image[0, 0, 0, 0]) / 1000, "flipped": 0}

    for value in (1.0, 2.0, 3.0):
        _check_full_size(np.full((1, 3, 64, 96), value, np.float32), plan, earned, cost, measure_on, lambda _: None)
    assert plan.sizes_measured == ["64x96", "64x96, image 2", "64x96, image 3"]
    assert [plan.deviation_by_size[key]["map"] for key in plan.sizes_measured] == [0.001, 0.002, 0.003]


def _attention_graph(keys=16, width=64):
    """y = Softmax((q * s) k^T) v, every tensor float32: the chain attention_chains finds."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Mul", ["q", "s"], ["qs"], name="scaled"),
             helper.make_node("MatMul", ["qs", "kt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
             helper.make_node("Relu", ["context"], ["y"], name="after")]
    initializers = [numpy_helper.from_array(np.float32([0.5]), "s"),
                    numpy_helper.from_array(rng.normal(size=(1, 1, width, keys)).astype(np.float32), "kt"),
                    numpy_helper.from_array(rng.normal(size=(1, 1, keys, width)).astype(np.float32), "v")]
    return small_onnx_model(nodes, [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, None, width])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, None, width])],
                            initializers)


@pytest.mark.parametrize("half", [set(), {"scaled", "scores", "context"}])
def test_attention_in_row_chunks_computes_each_row_as_the_whole_chain_does(half):
    """Row chunks (an uneven split: 50 rows in 4) of the plain chain and of its FP16 simulation
    (Casts between the products) give the whole chain's rows bit for bit, no node reading the
    whole score matrix."""
    from trufor_trt.precision.blocks import attention_chains
    from trufor_trt.precision.row_chunks import attention_in_row_chunks

    graph = upcast_fp16(lower_to_fp16(_attention_graph(), half))
    chains = attention_chains(_attention_graph())
    chunked = onnx.ModelProto.FromString(graph.SerializeToString())
    attention_in_row_chunks(chunked, chains, 4)
    q = np.random.default_rng(9).normal(size=(1, 1, 50, 64)).astype(np.float32)
    assert np.array_equal(run_onnx(chunked, q=q), run_onnx(graph, q=q))
    readers = {name for node in chunked.graph.node if node.op_type != "Split" for name in node.input}
    assert "scores" not in readers
    assert sum(node.op_type == "Softmax" for node in chunked.graph.node) == 4


def test_attention_in_row_chunks_leaves_a_chain_whose_scores_are_read_elsewhere_whole():
    from trufor_trt.precision.blocks import attention_chains
    from trufor_trt.precision.row_chunks import attention_in_row_chunks

    graph = _attention_graph()
    chains = attention_chains(graph)
    graph.graph.node.append(helper.make_node("ReduceMax", ["scores"], ["peak"], name="peak", keepdims=0))
    graph.graph.output.append(helper.make_tensor_value_info("peak", TensorProto.FLOAT, None))
    before = [node.name for node in graph.graph.node]
    attention_in_row_chunks(graph, chains, 4)
    assert [node.name for node in graph.graph.node] == before


def test_row_chunks_keep_stage_1_scores_within_the_chunk_size_at_full_size():
    from trufor_trt.architecture import stage_grids
    from trufor_trt.precision.row_chunks import CHUNK_BYTES, row_chunks_for

    assert row_chunks_for(256, 256) == 1
    (height, width), chunks = stage_grids(1536, 2048)[0], row_chunks_for(1536, 2048)
    scores_bytes = 4 * height * width * (height // 8) * (width // 8)  # one head, keys reduced 8x8
    assert scores_bytes > 8 * CHUNK_BYTES and scores_bytes / chunks <= CHUNK_BYTES


@pytest.mark.slow
def test_network_runs_reusing_block_outputs_run_only_what_a_change_reaches(model_seed0, monkeypatch):
    """With block outputs kept, a graph changed in a decoder runs the decoders alone (an
    unchanged one from its inputs, for its output), one changed in Noiseprint++ runs all but
    the RGB stream's first stage (which does not read Noiseprint++), one changed in both runs
    the decoders alone again (from the last run's block outputs, not the reference's), and the
    outputs equal the whole graph's bit for bit."""
    from trufor_trt.engine.onnxruntime_runner import create_session, run_session
    from trufor_trt.engine.preprocess import prepare_input
    from trufor_trt.export import measure
    from trufor_trt.export.measure import create_session_from_model
    from trufor_trt.export.synthetic import synthetic_image
    from trufor_trt.precision.blocks import attention_chains, block_of

    graph = onnx.load(model_seed0 / "trufor_fp32.onnx")
    prepared = [prepare_input(synthetic_image(64, 96, seed=seed)) for seed in (3, 4)]
    blocks_run, store = [], WeightStore()
    original = {node.name for node in graph.graph.node}
    monkeypatch.setattr(measure, "create_session_from_model", lambda model, store: blocks_run.append(
        {block_of(node.name) for node in model.graph.node if node.name in original})
        or create_session_from_model(model, store))
    light = store.detach(graph)
    runs = measure.NetworkRuns(prepared, light, attention_chains(graph), reuse_blocks=True, store=store)
    decoders = {"localization decoder", "confidence decoder"}
    decoder = {node.name for node in graph.graph.node if block_of(node.name) == "localization decoder"}
    first_layer = next(node.name for node in graph.graph.node if node.op_type == "Conv")
    assert block_of(first_layer) == "noiseprint++"
    for changed, expected in ((decoder, decoders),
                              ({first_layer}, set(map(block_of, original)) - {"rgb stream, stage 1"}),
                              ({first_layer} | decoder, decoders)):
        lowered = upcast_fp16(lower_to_fp16(light, changed, store), store=store)
        ours = runs.raw_outputs(lowered)
        assert blocks_run[-1] == expected - {"noiseprint++"}
        session = create_session(store.attach(lowered).SerializeToString())
        for raw, x in zip(ours, prepared):
            whole = run_session(session, x)
            for name in ("localization_logits", "confidence_logits", "noiseprint"):
                assert np.array_equal(getattr(raw, name), getattr(whole, name)), name


@pytest.mark.slow  # over 10 s on 2 cores
def test_network_runs_reuse_noiseprint_in_bands_and_equal_the_whole_graph(model_seed0, monkeypatch):
    """Split after Noiseprint++ and Noiseprint++ in row bands, a graph's outputs are the whole
    graph's bit for bit (and so are the two parts joined again); a second graph that changes only what follows Noiseprint++ does not run
    it again."""
    from trufor_trt.engine.onnxruntime_runner import create_session, run_session
    from trufor_trt.engine.preprocess import prepare_input
    from trufor_trt.export import measure
    from trufor_trt.export.measure import create_session_from_model
    from trufor_trt.export.chain_parts import cut_after_noiseprint, join_after_noiseprint
    from trufor_trt.export.synthetic import synthetic_image
    from trufor_trt.precision.blocks import attention_chains, block_of

    graph = onnx.load(model_seed0 / "trufor_fp32.onnx")
    prepared = prepare_input(synthetic_image(120, 72, seed=2))
    monkeypatch.setattr(measure, "NOISEPRINT_BAND_PIXELS", 72 * 40)  # 3 bands
    sessions, store = [], WeightStore()
    monkeypatch.setattr(measure, "create_session_from_model",
                        lambda model, store: sessions.append(1) or create_session_from_model(model, store))
    runs = measure.NetworkRuns([prepared], store.detach(graph), attention_chains(graph), store=store)
    ours, whole = runs.reference_outputs[0], run_session(create_session(graph.SerializeToString()), prepared)
    parts = cut_after_noiseprint(graph)  # and joined again, as INT8 quantizes the rest alone
    joined = run_session(create_session(join_after_noiseprint(parts["noiseprint"], parts["rest"], graph)
                                        .SerializeToString()), prepared)
    for name in ("localization_logits", "confidence_logits", "noiseprint"):
        assert np.array_equal(getattr(ours, name), getattr(whole, name)), name
        assert np.array_equal(getattr(joined, name), getattr(whole, name)), name
    decoder = {node.name for node in graph.graph.node if block_of(node.name) == "localization decoder"}
    lowered = upcast_fp16(lower_to_fp16(store.detach(graph), decoder, store), store=store)
    assert len(sessions) == 2
    changed = runs.raw_outputs(lowered)[0]
    assert len(sessions) == 3  # the rest only
    assert np.array_equal(changed.noiseprint, whole.noiseprint)
    assert not np.array_equal(changed.localization_logits, whole.localization_logits)


def test_graphs_of_a_weight_store_are_the_inline_graphs_without_their_bytes():
    """Passes and sessions over a WeightStore's graphs (large weights held once, stubs in the
    graph) make exactly the graphs they make with the weights inside, and run them to the same
    bits; equal weights get equal stubs, and a stub holds no bytes."""
    from trufor_trt.engine.onnxruntime_runner import create_session
    from trufor_trt.precision.weight_store import INLINE_BYTES

    rng = np.random.default_rng(8)
    weight = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)  # 147 KB: held in the store
    model = _conv_graph(weight, rng.standard_normal(64).astype(np.float32))
    x = rng.uniform(0.0, 2.0, size=(1, 64, 8, 8)).astype(np.float32)
    store = WeightStore()
    light = store.detach(model)
    stub = next(tensor for tensor in light.graph.initializer if tensor.name == "w")
    assert weight.nbytes >= INLINE_BYTES and not stub.raw_data and light.ByteSize() < INLINE_BYTES
    assert store.detach(model) == light  # by content
    for kernel in (*KERNEL_MODELS, STRESS_MODEL):
        for form in ("centered", "centered_split"):
            inline = upcast_fp16(lower_to_fp16(lower_convolutions(model, {"conv": form}, _centers_of(x))[0],
                                               {"relu"}), kernel)
            held = upcast_fp16(lower_to_fp16(lower_convolutions(light, {"conv": form}, _centers_of(x), store)[0],
                                             {"relu"}, store), kernel, store)
            assert store.attach(held).SerializeToString() == inline.SerializeToString(), (kernel, form)
            expected = create_session(inline.SerializeToString()).run(None, {"x": x})[0]
            session = create_session(held.SerializeToString(), initializers=store.initializers(held))
            assert np.array_equal(session.run(None, {"x": x})[0], expected), (kernel, form)


def test_a_noiseprint_layer_trial_runs_from_its_kept_input_and_equals_the_whole_graph(model_seed0):
    """A trial of layer k runs from the FP32 graph's input to layer k (the layers before are
    unchanged): its Noiseprint++ equals the whole lowered graph's bit for bit, first, middle and
    last layer, both forms."""
    from trufor_trt.engine.onnxruntime_runner import create_session
    from trufor_trt.engine.preprocess import prepare_input
    from trufor_trt.engine.runner import INPUT_NAME
    from trufor_trt.export import fp16_plan
    from trufor_trt.export.measure import unchanged_tensors
    from trufor_trt.export.synthetic import synthetic_image

    graph = fp16_plan.noiseprint_graph(onnx.load(model_seed0 / "trufor_fp32.onnx"))
    inputs = [prepare_input(synthetic_image(40, 56, seed=seed)) for seed in (5, 6)]
    activations = fp16_plan.noiseprint_activations(graph, inputs)
    centers = fp16_plan.noiseprint_centers(graph, activations)
    measure = fp16_plan.NoiseprintMeasure(graph, activations, centers)
    convs = [node for node in graph.graph.node if node.op_type == "Conv"]
    assert set(measure._kept) == {conv.input[0] for conv in convs[1:]}  # every layer's input but the image
    for conv in (convs[0], convs[len(convs) // 2], convs[-1]):
        for form in ("centered", "centered_split"):
            lowered = upcast_fp16(lower_convolutions(graph, {conv.name: form}, centers)[0], "rounded_output")
            given = unchanged_tensors(lowered, graph, {INPUT_NAME}) & set(measure._kept)
            assert (conv.input[0] in given) == (conv is not convs[0])  # the layer's kept input is fed
            whole = create_session(lowered.SerializeToString())
            for prepared, value in zip(inputs, measure._run(lowered)):
                assert np.array_equal(value, whole.run(None, {INPUT_NAME: prepared})[0]), (conv.name, form)
