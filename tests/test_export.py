"""`trufor-trt export`: a TensorRT-shaped, self-verified, self-describing model folder."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="exporting needs torch (the export extra)")
onnx = pytest.importorskip("onnx", reason="exporting needs onnx (the export extra)")
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from trufor_trt.architecture import EMBED_DIMS
from trufor_trt.cli import app
from trufor_trt.engine.model_dir import MANIFEST_FILE, VARIANTS, ModelDir, ModelDirError
from trufor_trt.files import sha256_file
from trufor_trt.export import verify
from trufor_trt.export.bundle import export_model_dir
from trufor_trt.export.graph_rules import TENSORRT_ONNX_OPERATORS, operator_types, tensorrt_shape_problems
from trufor_trt.export.verify import ExportVerificationError
from trufor_trt.precision.blocks import attention_chains

from conftest import make_checkpoint

ATTENTION_LAYERS = 2 * (3 + 4 + 6 + 3)  # two streams x MiT-B2 depths


@pytest.fixture(scope="module")
def graphs(model_seed0):
    return {variant.name: onnx.load(model_seed0 / variant.file, load_external_data=False)
            for variant in VARIANTS}


def test_manifest_describes_the_folder(model_seed0, checkpoint_seed0):
    manifest = json.loads((model_seed0 / MANIFEST_FILE).read_text())
    assert manifest["checkpoint"]["sha256"] == sha256_file(checkpoint_seed0)
    assert set(manifest["variants"]) == {variant.name for variant in VARIANTS}
    for name, digest in manifest["files"].items():
        assert sha256_file(model_seed0 / name) == digest
    assert manifest["input"]["value"] == "uint8 / 256" and manifest["input"]["min_side"] == 29
    assert set(manifest["outputs"]) == {"localization_logits", "confidence_logits", "noiseprint"}
    assert manifest["tools"]["onnxruntime"] and manifest["tools"]["torch"]
    assert manifest["detection_head"]["file"] in manifest["files"]
    results = manifest["verification"]["results"]
    assert {tuple(result["size"]) for result in results} == {(61, 83), (96, 128)}
    for result in results:
        for output, error in result["max_abs"].items():
            assert error <= manifest["verification"]["bounds_max_abs"][output]


def test_tensorrt_graph_uses_only_parser_operators(graphs):
    graph = graphs["fp32"]
    assert operator_types(graph) <= TENSORRT_ONNX_OPERATORS
    assert tensorrt_shape_problems(graph) == []


def _symbolic_axes(graph_name: str, value_name: str, rank: int) -> list:
    """Which axes of a graph input or output follow the image: all but channels (and the
    unit batch of the decoder maps graph's outputs)."""
    if graph_name == "fp32-cpu" and value_name.startswith("c"):
        return [0, 1, 2]  # the encoder's maps, channels last: batch, height, width
    if value_name.endswith(("_rows", "_vertical")) or (value_name.endswith("_wide") and rank == 3):
        return [0, 1]  # rows of a channels-last map, or a rows x rows interpolation matrix
    if value_name.endswith("_wide"):
        return [1, 2]
    if graph_name == "fp32-cpu-decoders":
        return [1, 2]  # a band's logits: classes x rows x width
    return [0, 2, 3]  # images and NCHW maps: batch, height, width


def test_height_and_width_are_symbolic(graphs):
    for graph_name, graph in graphs.items():
        for value in [*graph.graph.input, *graph.graph.output]:
            dims = value.type.tensor_type.shape.dim
            symbolic = [axis for axis, dim in enumerate(dims) if dim.dim_param and not dim.dim_value]
            assert symbolic == _symbolic_axes(graph_name, value.name, len(dims)), (graph_name, value.name)
        assert graph.ir_version == 10


def test_attention_is_in_the_form_tensorrt_fuses(graphs):
    """Mul(q, 1/8) -> MatMul -> Softmax -> MatMul, once per attention layer."""
    graph = graphs["fp32"]
    chains = attention_chains(graph)
    assert len(chains) == ATTENTION_LAYERS
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    nodes = {node.name: node for node in graph.graph.node}
    for scale, *_ in chains:
        assert any(np.allclose(constants.get(name, np.nan), 0.125) for name in nodes[scale].input)


def test_cpu_variant_uses_onnxruntime_multi_head_attention(graphs):
    nodes = [node for node in graphs["fp32-cpu"].graph.node if node.op_type == "MultiHeadAttention"]
    assert len(nodes) == ATTENTION_LAYERS
    assert all(node.domain == "com.microsoft" for node in nodes)


def _as_onnxruntime_optimises_it(path, folder) -> onnx.ModelProto:
    """The graph after ONNX Runtime's CPU optimiser (what it runs), as the runner sets it up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(folder / "optimised.onnx")


def _producers(graph: onnx.ModelProto) -> dict:
    return {output: node for node in graph.graph.node for output in node.output}


def test_cpu_encoder_runs_as_arithmetic_without_layout_passes(model_seed0, tmp_path):
    """In the encoder as ONNX Runtime runs it: every token Linear's bias is inside its product
    (no Add of a constant after a MatMul), and no transformer block is left with a token <->
    grid transpose (the convolutions' layout conversions absorbed them: channels-last
    ReorderInput/Output)."""
    path = model_seed0 / next(variant.file for variant in VARIANTS if variant.name == "fp32-cpu")
    graph = _as_onnxruntime_optimises_it(path, tmp_path)
    producers, constants = _producers(graph), {init.name for init in graph.graph.initializer}
    late_biases = [node.name for node in graph.graph.node if node.op_type == "Add"
                   and any(getattr(producers.get(name), "op_type", None) == "MatMul" for name in node.input)
                   and any(name in constants for name in node.input)]
    assert late_biases == []
    token_linears = 3 * ATTENTION_LAYERS + 4 * len(EMBED_DIMS)  # q, kv, proj; each fusion's four
    assert sum(node.op_type in ("Gemm", "FusedGemm") for node in graph.graph.node) >= token_linears
    assert [node.name for node in graph.graph.node if node.op_type == "Transpose" and "block" in node.name] == []


def _tiny_graph(op: str, attributes=None, dims=("batch", 3, "height", "width")):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))]
    node = helper.make_node(op, ["x"], ["y"], **(attributes or {}))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph([node], "tiny", inputs, outputs))


@pytest.mark.parametrize("graph, fragment", [
    (_tiny_graph("Relu"), None),
    (_tiny_graph("NonZero"), "data-dependent"),
    (_tiny_graph("Hardmax"), "not parsed by TensorRT"),
    (_tiny_graph("Resize", {"mode": "cubic"}), "Resize cubic"),
    (_tiny_graph("Relu", dims=(1, 3, 224, 224)), "fixed, not symbolic"),
    (_tiny_graph("Resize", {"mode": "linear", "antialias": 1}), "Resize antialias"),
    (_tiny_graph("Resize", {"mode": "linear", "keep_aspect_ratio_policy": "stretch"}),
     "Resize keep_aspect_ratio_policy"),
])
def test_shape_rules_catch_what_tensorrt_cannot_build(graph, fragment):
    problems = tensorrt_shape_problems(graph)
    if fragment is None:
        assert problems == []
    else:
        assert any(fragment in problem for problem in problems), problems


def _graph_reading(op: str, index: int, source: str):
    """`op` whose input `index` is the tensor "axes", produced as `source` says."""
    inputs = ["x"] + [""] * (index - 1) + ["axes"]
    nodes = [helper.make_node(op, inputs, ["y"], name="reader")]
    initializers = [numpy_helper.from_array(np.array([0], np.int64), "axes")]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])]
    if source == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["axes"], value=initializers.pop()))
    elif source == "computed":
        initializers[0].name = "raw_axes"
        nodes.insert(0, helper.make_node("Identity", ["raw_axes"], ["axes"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "reader", graph_inputs, outputs, initializers))


@pytest.mark.parametrize("op, index, source, refused", [
    ("Slice", 3, "initializer", False), ("Slice", 3, "constant", True), ("Slice", 3, "computed", True),
    ("Squeeze", 1, "constant", True), ("Pad", 3, "computed", True), ("CumSum", 1, "constant", True),
    ("Unsqueeze", 1, "constant", False), ("Unsqueeze", 1, "computed", True),
    ("ReduceSum", 1, "constant", False), ("ReduceMean", 1, "computed", True),
])
def test_weight_inputs_must_be_what_the_tensorrt_parser_reads(op, index, source, refused):
    problems = [problem for problem in tensorrt_shape_problems(_graph_reading(op, index, source))
                if problem.startswith("reader:")]
    assert bool(problems) is refused, problems


@pytest.mark.slow
def test_failed_verification_leaves_no_folder(tmp_path, checkpoint_seed0, monkeypatch):
    monkeypatch.setattr(verify, "BOUNDS", {name: 1e-12 for name in verify.BOUNDS})
    out = tmp_path / "model"
    with pytest.raises(ExportVerificationError, match="is not faithful"):  # the CPU graphs suffice
        export_model_dir(checkpoint_seed0, out, on_step=lambda message: None, with_tensorrt=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_command_writes_a_loadable_folder(tmp_path, checkpoint_seed0, recwarn):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint_seed0),
                                      "--out", str(tmp_path / "m"), "--opset", "17"])
    assert result.exit_code == 0, result.output
    # The exporter's notes on what it could not fold are understood and not shown (issue 41).
    assert not [warning for warning in recwarn if "Constant folding" in str(warning.message)]
    model = ModelDir.open(tmp_path / "m", checkpoint_sha256=sha256_file(checkpoint_seed0))
    assert model.manifest["opset"] == 17


def test_export_command_refuses_a_wrong_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not a readable PyTorch checkpoint" in result.output
    assert not (tmp_path / "m").exists()


def _copy(model_seed0, tmp_path):
    return shutil.copytree(model_seed0, tmp_path / "copy")


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


REFUSALS = {
    "format_version": (lambda folder: _edit_manifest(folder, format_version=99), "version 99"),
    "no_manifest": (lambda folder: (folder / MANIFEST_FILE).unlink(), "no manifest.json"),
    "missing_graph": (lambda folder: (folder / VARIANTS[1].file).unlink(), "is missing"),
    "modified_head": (lambda folder: (folder / "detection_head.npz").write_bytes(b"x"),
                      "does not match its manifest hash"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unusable_model_folders_are_refused(tmp_path, model_seed0, case):
    damage, fragment = REFUSALS[case]
    folder = _copy(model_seed0, tmp_path)
    damage(folder)
    with pytest.raises(ModelDirError, match=fragment):
        ModelDir.open(folder)


def test_model_folder_from_another_checkpoint_is_refused(tmp_path, model_seed0, checkpoint_seed0):
    other = make_checkpoint(tmp_path / "seed5.pth.tar", 5)
    result = CliRunner().invoke(app, ["analyze", str(checkpoint_seed0), "--out", str(tmp_path / "o"),
                                      "--model", str(model_seed0), "--checkpoint", str(other),
                                      "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "exported from checkpoint" in result.output
