"""TensorRT's chain of engines, proven up to TensorRT itself: the part graphs it builds from are
cut from the TensorRT-shaped graph and run here through ONNX Runtime, with the one band/chain
driver (engine/chain.py) the TensorRT runner also uses; the device memory plan and `build`'s
dry run need no TensorRT either."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="cutting the chain's parts needs onnx (the export extra)")
pytest.importorskip("torch", reason="the export's verification needs torch (the export extra)")
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.engine.chain_plan import device_memory_model, part_profiles, plan_chain
from trufor_trt.engine.memory_budget import GIB, MemoryBudgetError
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.onnxruntime_runner import MEMORY, CpuSessions, create_session, run_session
from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.tensorrt_plan import Profile, Sidecar
from trufor_trt.export.chain_parts import CHAIN_PARTS, chain_part_graphs, cut_chain_parts, encoder_maps
from trufor_trt.export.graph_rules import tensorrt_shape_problems
from trufor_trt.export.synthetic import synthetic_image
from trufor_trt.export.verify import raw_deviation

from conftest import golden_files, max_abs_error, tolerance

GOLDEN = golden_files()


@pytest.fixture(scope="module")
def tensorrt_chain(model_seed0):
    """The chain TensorRT would build from the fp32 graph, as ONNX Runtime sessions."""
    graphs = chain_part_graphs(ModelDir.open(model_seed0), "fp32")
    return graphs, CpuSessions.from_files(graphs, names=CHAIN_PARTS)


def test_every_part_is_tensorrt_shaped_and_the_decoders_read_the_encoders_maps(tensorrt_chain):
    graphs, _ = tensorrt_chain
    for part, serialized in graphs.items():
        graph = onnx.load_from_string(serialized)
        onnx.checker.check_model(graph, full_check=True)
        assert tensorrt_shape_problems(graph) == [], part
    encoder = onnx.load_from_string(graphs["encoder"])
    maps = onnx.load_from_string(graphs["decoder-maps"])
    assert [value.name for value in encoder.graph.input] == ["image", "noiseprint"]
    assert [value.name for value in encoder.graph.output] == ["c1", "c2", "c3", "c4"]
    assert {"c1_rows", "c2_rows", "c3_rows", "c4_rows"} == {value.name for value in maps.graph.input}
    # Noiseprint++ alone: no encoder or decoder weights came with it.
    noiseprint = onnx.load_from_string(graphs["noiseprint"])
    assert all(tensor.name.startswith(("onnx::", "dncnn")) or "dncnn" in tensor.name
               for tensor in noiseprint.graph.initializer)


def test_the_chain_in_bands_equals_the_whole_tensorrt_graph(model_seed0, tensorrt_chain):
    """Several bands of each kind at 300 x 420 (Noiseprint++ 40 rows, decoder groups of 13)."""
    _, chain = tensorrt_chain
    prepared = prepare_input(synthetic_image(300, 420, seed=11))
    whole = run_session(create_session(ModelDir.open(model_seed0).variant_path("fp32")), prepared)
    in_bands = chain.run(prepared, 40, 13)
    deviation = raw_deviation(in_bands, whole)
    assert deviation["noiseprint"] < 1e-6 and max(deviation.values()) < 1e-5, deviation


@pytest.mark.parametrize("golden_path", GOLDEN, ids=lambda path: path.stem)
def test_the_chain_reproduces_the_goldens(model_seed0, tensorrt_chain, golden_path):
    _, chain = tensorrt_chain
    golden = np.load(golden_path)
    prepared = prepare_input(golden["rgb"])
    head = ModelDir.open(model_seed0).detection_head()
    analysis = postprocess(chain.run(prepared, 48, 9), head)
    ours = {"map": analysis.localization_map, "conf": analysis.confidence_map, "score": analysis.score,
            "np++": analysis.noiseprint}
    for key, value in ours.items():
        assert max_abs_error(value, golden, key) <= tolerance(golden, key), key


def test_the_encoder_maps_are_found_in_reduced_precision_graphs_too(model_seed0):
    """A precision variant renames the maps (its casts): the cut follows the decoders' reads."""
    whole = onnx.load(ModelDir.open(model_seed0).variant_path("fp32"))
    for node in whole.graph.node:  # a float16 lowering's renaming, as export --precision does it
        node.output[:] = [name + "/fp16" if "FFMs." in name and name.endswith("BatchNormalization_output_0")
                          else name for name in node.output]
        node.input[:] = [name + "/fp16" if "FFMs." in name and name.endswith("BatchNormalization_output_0")
                         else name for name in node.input]
    parts = cut_chain_parts(whole)
    feeds = {"image": prepare_input(synthetic_image(64, 96, seed=2))}
    feeds["noiseprint"] = create_session(parts["noiseprint"].SerializeToString()).run(None, feeds)[0]
    maps = create_session(parts["encoder"].SerializeToString()).run(None, feeds)
    assert [tuple(scale.shape) for scale in maps] == [(1, 16, 24, 64), (1, 8, 12, 128), (1, 4, 6, 320),
                                                      (1, 2, 3, 512)]


def test_an_int8_decoder_reads_the_same_encoder_maps(model_seed0):
    """An INT8 plan may quantize a decoder's convolution: the decoders then read its weight
    through a DequantizeLinear (a tensor made of weights alone), and the maps through
    quantize-dequantize pairs, also where a float16 decoder casts the dequantized map: the
    chain's FP32 decoders take the maps themselves."""
    from onnx import helper, numpy_helper

    whole = onnx.load(ModelDir.open(model_seed0).variant_path("fp32"))
    maps = encoder_maps(whole)
    weights = {tensor.name: tensor for tensor in whole.graph.initializer}
    # Its DequantizeLinear is named after the weight, outside the decoders' name scope.
    conv = next(node for node in whole.graph.node if node.name == "/decode_head_conf/linear_pred/Conv")
    weight = numpy_helper.to_array(weights[conv.input[1]])
    scale = np.float32(np.abs(weight).max() / 127)
    quantized, dequantized = f"{conv.input[1]}_quantized", f"{conv.input[1]}_DequantizeLinear_Output"
    whole.graph.initializer.extend([numpy_helper.from_array(np.round(weight / scale).astype(np.int8), quantized),
                                    numpy_helper.from_array(np.array(scale), f"{quantized}_scale")])
    whole.graph.node.append(helper.make_node("DequantizeLinear", [quantized, f"{quantized}_scale"], [dequantized],
                                             name=f"{conv.input[1]}_DequantizeLinear"))
    conv.input[1] = dequantized
    for scale, tensor in enumerate(maps):  # as ONNX Runtime's quantizer and lower_to_fp16 name them
        quantized, dequantized = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        whole.graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), f"{quantized}/scale"))
        whole.graph.node.extend([
            helper.make_node("QuantizeLinear", [tensor, f"{quantized}/scale"], [quantized], name=quantized),
            helper.make_node("DequantizeLinear", [quantized, f"{quantized}/scale"], [dequantized], name=dequantized),
            helper.make_node("Cast", [dequantized], [f"{dequantized}/fp16"], to=onnx.TensorProto.FLOAT16,
                             name=f"{dequantized}/fp16/lower")])
        for node in whole.graph.node:
            if node.name.startswith(("/decode_head/", "/decode_head_conf/")) and tensor in node.input:
                reads = dequantized if node.name.startswith("/decode_head_conf/") else f"{dequantized}/fp16"
                node.input[:] = [reads if name == tensor else name for name in node.input]
    assert encoder_maps(whole) == maps
    assert set(cut_chain_parts(whole)) == {"noiseprint", "encoder"}


def test_the_device_memory_plan_bands_what_fits_and_refuses_what_cannot():
    profile = Profile(min=(32, 32), opt=(768, 768), max=(3000, 4000))
    roomy = plan_chain("fp16", profile, 0.3e9, 6 * GIB)
    tight = plan_chain("fp16", profile, 0.3e9, roomy.estimated_bytes - 0.3 * GIB)
    assert tight.bands.noiseprint_rows < roomy.bands.noiseprint_rows
    assert tight.estimated_bytes <= roomy.estimated_bytes - 0.3 * GIB
    # FP16 activations take half FP32's: a budget can take FP16 and refuse FP32.
    budget = plan_chain("fp16", profile, 0.3e9).estimated_bytes
    with pytest.raises(MemoryBudgetError, match=r"4000x3000 needs about \d\.\d GiB .* budget \(--max-memory\); "
                                                 r"it takes up to about \d+x\d+ at this aspect"):
        plan_chain("fp32", profile, 0.3e9, budget)
    message = device_memory_model("fp32", 0.3e9).refusal(3000, 4000, budget)
    width, height = (int(side) for side in message.rsplit("about ", 1)[1].split(" ")[0].split("x"))
    assert 3 * width == 4 * height or abs(3 * width - 4 * height) <= 4  # same aspect
    assert device_memory_model("fp32", 0.3e9).refusal(height, width, budget) is None
    assert device_memory_model("fp32", 0.3e9).refusal(height + 40, width + 53, budget) is not None


def test_part_profiles_hold_every_band_the_chain_runs():
    """Every shape the driver feeds a part, at sizes across the profile, lies within its profile."""
    profile = Profile(min=(32, 32), opt=(768, 768), max=(1000, 1400))
    plan = MEMORY.plan(1000, 1400, None)
    profiles = {part.part: part.inputs for part in part_profiles(profile, plan)}
    from trufor_trt.engine.chain import ChainParts, run_chain

    class Recorder(ChainParts):
        """Records each step's input shapes (what TensorRT would be given)."""

        def __init__(self):
            self.fed = []

        def start(self, prepared):
            self.height, self.width = prepared.shape[2:]
            from trufor_trt.architecture import EMBED_DIMS, stage_grids
            self.grids, self.dims = stage_grids(self.height, self.width), EMBED_DIMS

        def noiseprint_band(self, top, bottom, first, last):
            self.fed.append(("noiseprint", {"image": (1, 3, last - first, self.width)}))

        def encoder(self):
            self.fed.append(("encoder", {"image": (1, 3, self.height, self.width),
                                         "noiseprint": (1, 1, self.height, self.width)}))

        def decoder_group(self, group):
            shapes = {"c1_rows": (group.bottom - group.top, self.grids[0][1], 64)}
            for scale, (first, last) in zip((3, 2, 1), group.coarse_rows):
                shapes[f"c{scale + 1}_rows"] = (last - first, self.grids[scale][1], self.dims[scale])
            self.fed.append(("decoder-maps", shapes))

        def decoder_band(self, band):
            shapes = {"c1_rows": (band.bottom - band.top, self.grids[0][1], 64)}
            for scale, (start, stop), matrix in zip((3, 2, 1), band.reads, band.vertical):
                shapes[f"c{scale + 1}_wide"] = (stop - start, self.grids[0][1], 1024)
                shapes[f"c{scale + 1}_vertical"] = matrix.shape
            self.fed.append(("decoder-band", shapes))

        def finish(self):
            return None

    for height, width in ((32, 32), (33, 700), (1000, 1400), (517, 1399), (999, 64)):
        recorder = Recorder()
        run_chain(recorder, np.zeros((1, 3, height, width), np.float32), plan)
        for part, shapes in recorder.fed:
            for name, shape in shapes.items():
                smallest, _, largest = profiles[part][name]
                assert all(low <= side <= high for low, side, high in zip(smallest, shape, largest)), \
                    (height, width, part, name, shape, smallest, largest)


def test_build_without_tensorrt_says_what_it_would_build_and_exits_2(model_seed0):
    result = CliRunner().invoke(app, ["build", "--fp32", "--model", str(model_seed0), "--max-shape", "3000x4000",
                                      "--max-memory", "7G"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "a chain of 4 fp32 engines for images up to 3000x4000" in lines[1]
    assert [line.split(":")[0].strip() for line in lines[2:6]] == list(CHAIN_PARTS)
    assert "1x3x3000x4000" in lines[3]  # the encoder takes the whole image
    assert "device memory at 3000x4000: about" in lines[6] and "GiB (estimated)" in lines[6]
    assert lines[-1].startswith("error: no NVIDIA GPU or driver found") and "TensorRT is not installed" in lines[-1]


def test_build_refuses_a_chain_that_cannot_fit_the_given_memory(model_seed0):
    result = CliRunner().invoke(app, ["build", "--fp32", "--model", str(model_seed0), "--max-shape", "3000x4000",
                                      "--max-memory", "3G"])
    assert result.exit_code == 2
    assert "needs about" in result.output and "it takes up to about" in result.output
    result = CliRunner().invoke(app, ["build", "--fp32", "--model", str(model_seed0), "--max-shape", "3000x4000",
                                      "--max-memory", "2G"])  # not even the runtime, weights and workspace
    assert result.exit_code == 2 and "it takes no image of this aspect" in result.output


def test_a_chain_sidecar_is_read_and_a_changed_part_is_refused(tmp_path):
    folder = tmp_path / "fp16-chain-32x32_768x768_3000x4000"
    folder.mkdir()
    (folder / "noiseprint.engine").write_bytes(b"engine bytes")
    from trufor_trt.files import sha256_bytes

    chain = {"bands": {"noiseprint_rows": 100, "decoder_rows": 32},
             "parts": {"noiseprint": {"file": "noiseprint.engine", "sha256": sha256_bytes(b"engine bytes"),
                                      "profile": {}, "build_seconds": 1.0}}, "estimated_device_bytes": 1}
    sidecar = Sidecar(precision="fp16", profile={"min": [32, 32], "opt": [768, 768], "max": [3000, 4000]},
                      tensorrt_version="10.3.0", device="Orin", compute_capability=[8, 7], onnx_file="x.onnx",
                      onnx_sha256="0", strongly_typed=True, builder_flags=[], cleared_flags=["TF32"], tf32=False,
                      workspace_gib=1.0, build_seconds=1.0, engine_sha256="0", chain=chain)
    from trufor_trt.engine.tensorrt_plan import sidecar_path

    sidecar.write(sidecar_path(folder))
    assert sidecar_path(folder).name == "fp16-chain-32x32_768x768_3000x4000.json"
    read = Sidecar.read(sidecar_path(folder))
    read.check_files(folder)
    (folder / "noiseprint.engine").write_bytes(b"other bytes")
    with pytest.raises(Exception, match="noiseprint engine differs"):
        read.check_files(folder)
    # A sidecar written before chains existed (no `chain` field) is still read.
    values = json.loads(sidecar_path(folder).read_text())
    del values["chain"]
    sidecar_path(folder).write_text(json.dumps(values))
    assert Sidecar.read(sidecar_path(folder)).chain is None
