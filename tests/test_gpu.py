"""On an NVIDIA GPU only: the CUDA layers, the PyTorch network on CUDA (FP32 without TF32, and
the FP16 plan's blocks in real float16), and TensorRT engines where TensorRT imports.
Elsewhere every test here is skipped with its reason (no mocks stand in for them).

`bash tests/gpu_checks.sh run` runs them on a lent GPU machine (docs/tensorrt.md, "GPU checks"); the
measured deviations are printed and, with $TRUFOR_GPU_REPORT set, added to that JSON file.
"""

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.export.synthetic import synthetic_image

from conftest import IMAGES_DIR, golden_files, max_abs_error, tolerance

pytestmark = pytest.mark.gpu

LARGE_IMAGE = IMAGES_DIR / "tampered1.png"  # 1536 x 2048, the official RGBA test image


def _layer(name: str):
    from trufor_trt.engine.cuda_layer import cuda_layer
    from trufor_trt.errors import EngineError

    try:
        return cuda_layer(name)
    except EngineError as exc:
        pytest.skip(f"CUDA layer {name}: {exc}")


def _available_layers() -> list:
    from trufor_trt.engine.cuda_layer import LAYERS, cuda_layer
    from trufor_trt.errors import EngineError

    available = []
    for name in LAYERS:
        try:
            cuda_layer(name)
            available.append(name)
        except EngineError as exc:
            print(f"CUDA layer {name} not checked: {exc}")
    return available


# Session-scoped, so that pytest asks them before it builds a test's module-scoped fixtures.
@pytest.fixture(scope="session")
def torch_cuda():
    """torch, where it sees a CUDA GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")
    return torch


@pytest.fixture(scope="session")
def tensorrt_ready():
    from trufor_trt.errors import EngineError
    from trufor_trt.engine.tensorrt_start import import_tensorrt

    try:
        import_tensorrt()
    except EngineError as exc:
        pytest.skip(str(exc))
    _layer(None)


def record(section: str, values: dict) -> None:
    """Print a measurement and add it to $TRUFOR_GPU_REPORT (JSON), for the run's report."""
    print(f"\n{section}: {json.dumps(values)}")
    target = os.environ.get("TRUFOR_GPU_REPORT")
    if target:
        path = Path(target)
        report = json.loads(path.read_text()) if path.is_file() else {}
        report[section] = values
        path.write_text(json.dumps(report, indent=2) + "\n")


@pytest.mark.parametrize("layer_name", ["pycuda", "cuda-python"])
def test_cuda_layer_pinned_async_copies_events_streams_and_threads(layer_name):
    layer = _layer(layer_name)
    count = 1 << 20
    errors = []

    def round_trip(scale: float) -> None:
        try:
            with layer.current() as cuda:
                streams = [cuda.stream(), cuda.stream()]
                sources = [np.arange(count, dtype=np.float32) * (scale + k) for k in range(2)]
                pinned = [cuda.pinned_buffer(4 * count) for _ in range(4)]
                device = [cuda.device_buffer(4 * count) for _ in range(2)]
                start, end = cuda.event(), cuda.event()
                start.record(streams[0])
                for k, stream in enumerate(streams):
                    staged = pinned[k].view(np.float32, count)
                    np.copyto(staged, sources[k])
                    cuda.copy_to_device(device[k], staged, stream)
                    cuda.copy_to_host(pinned[2 + k].view(np.float32, count), device[k], stream)
                end.record(streams[0])
                for stream in streams:
                    stream.synchronize()
                assert end.milliseconds_since(start) >= 0
                for k in range(2):
                    np.testing.assert_array_equal(pinned[2 + k].view(np.float32, count), sources[k])
                for buffer in [*device, *pinned]:
                    buffer.free()
                for handle in [*streams, start, end]:
                    handle.close()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=round_trip, args=(float(index),)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    gpu = layer.gpu()
    assert gpu.name and gpu.compute_capability[0] >= 5 and layer.total_memory() > 0
    record(f"cuda layer {layer_name}", {"gpu": gpu.name, "driver_cuda": layer.driver_version()})


@pytest.mark.parametrize("golden_path", golden_files(), ids=lambda path: path.stem)
def test_torch_network_on_cuda_matches_the_goldens_in_fp32(torch_cuda, checkpoint_seed0, golden_path):
    torch = torch_cuda
    from trufor_trt.engine.torch_runner import TorchRunner

    golden = np.load(golden_path)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with TorchRunner(checkpoint_seed0, device="cuda") as runner:
        analysis = postprocess(runner.infer(prepare_input(golden["rgb"])), runner.detection_head)
    assert torch.backends.cudnn.allow_tf32  # the user's setting is back once the runner is done
    errors = {}
    for key, ours in (("map", analysis.localization_map), ("conf", analysis.confidence_map),
                      ("score", analysis.score), ("np++", analysis.noiseprint)):
        errors[key] = max_abs_error(ours, golden, key)
        assert errors[key] <= tolerance(golden, key)
    record(f"torch cuda fp32 vs golden {golden_path.stem}", errors)


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory, model_seed0) -> Path:
    """The seed-0 model folder with its FP16 variant, planned on CocoGlide crops (no full-size
    check: the test compares this plan's real float16 with its simulation at each size)."""
    from trufor_trt.export.variants import add_precision_variant

    model = Path(shutil.copytree(model_seed0, tmp_path_factory.mktemp("gpu") / "model"))
    calibration = tmp_path_factory.mktemp("calibration")
    for path in sorted((IMAGES_DIR / "cocoglide_sample").rglob("*.png"))[::13]:
        shutil.copy(path, calibration / path.name)
    add_precision_variant(model, "fp16", calibration, on_step=print)
    return model


def _module_block(path: str) -> str:
    """The FP16 plan's block of a module, from its path as the exporter names its nodes."""
    from trufor_trt.precision.blocks import block_of

    parts = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return block_of("/" + "/".join(parts) + "/")


def _modules_of_blocks(network, blocks: set) -> list:
    """The largest modules each lying wholly inside one of `blocks`."""
    chosen = []

    def visit(prefix, module):
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            inner = {_module_block(f"{path}.{sub}") for sub, _ in child.named_modules() if sub}
            own = _module_block(path)
            if own in blocks and inner <= {own}:
                chosen.append(child)
            else:
                visit(path, child)

    visit("", network)
    return chosen


@contextmanager
def fp16_plan_blocks(torch, network, blocks: set):
    """The plan's blocks compute in float16 (autocast: convolutions and products in float16,
    LayerNorm and Softmax kept float32, as the plan keeps them), the fusion's sums over all
    pixels in float32 (the plan keeps them so); everything else float32."""
    from trufor_trt.model.fusion import CrossAttention

    originals = []
    for module in _modules_of_blocks(network, blocks):
        forward = module.forward

        def in_half(*args, _forward=forward, **kwargs):
            with torch.autocast("cuda", dtype=torch.float16):
                out = _forward(*args, **kwargs)
            return tuple(t.float() if torch.is_tensor(t) else t for t in out) if isinstance(out, tuple) else out.float()

        originals.append((module, forward))
        module.forward = in_half
    context = CrossAttention.context

    def context_in_float32(self, kv, tokens):
        from trufor_trt.model.layers import split_key_value

        key, value = split_key_value(kv(tokens), self.heads)
        with torch.autocast("cuda", enabled=False):
            return ((key.float().transpose(-2, -1) @ value.float()) * self.scale).softmax(dim=-2)

    CrossAttention.context = context_in_float32
    try:
        yield
    finally:
        CrossAttention.context = context
        for module, forward in originals:
            module.forward = forward


def _folded(torch, conv, norm) -> tuple:
    """(weight, bias) of a Conv with its BatchNorm folded in, as the exporter folds it (float32)."""
    weight, bias = conv.weight.detach().double(), torch.zeros(conv.out_channels, dtype=torch.float64,
                                                              device=conv.weight.device)
    if conv.bias is not None:
        bias = conv.bias.detach().double()
    if norm is not None:
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight, bias = weight * scale[:, None, None, None], (bias - norm.running_mean.double()) * scale \
            + norm.bias.double()
    return weight.float(), bias.float()


def _centered_conv16(torch, conv, norm, center):
    """A Noiseprint++ Conv (+ its BatchNorm) in precision/conv16.py's centered form, the
    convolution of the centered input in real float16 on cuDNN (its float16 output written
    before the float32 offset is added), the offset convolution of the all-ones image in float32."""
    weight, bias = _folded(torch, conv, norm)
    center = torch.tensor(center, dtype=torch.float32, device=weight.device).view(1, -1, 1, 1)
    weight16 = weight.half()
    offset_kernel = (weight.double() * center.double()).sum(1, keepdim=True).float()

    class Centered(torch.nn.Module):
        def forward(self, x):
            product = torch.nn.functional.conv2d((x - center).half(), weight16, padding=1)
            ones = torch.ones_like(x[:, :1])
            return product.float() + torch.nn.functional.conv2d(ones, offset_kernel, bias, padding=1)

    return Centered()


@contextmanager
def noiseprint_conv_forms(torch, dncnn, forms: dict, centers: dict):
    """The plan's Noiseprint++ convolutions (`/dncnn/dncnn.<i>/Conv` -> "centered") in float16."""
    saved = dict(enumerate(dncnn))
    for name in forms:
        index = int(name.split("dncnn.")[-1].split("/")[0])
        norm = dncnn[index + 1] if isinstance(dncnn[index + 1] if index + 1 < len(dncnn) else None,
                                              torch.nn.BatchNorm2d) else None
        dncnn[index] = _centered_conv16(torch, dncnn[index], norm, centers[name])
        if norm is not None:
            dncnn[index + 1] = torch.nn.Identity()
    try:
        yield
    finally:
        for index, module in saved.items():
            dncnn[index] = module


def _blocks_wholly_in_fp16(units: dict) -> set:
    """The plan's blocks whose every unit (a block's attention is a unit apart) earned FP16:
    autocast lowers modules, not the plan's finer units."""
    from trufor_trt.export.fp16_search import ATTENTION, NOISEPRINT

    blocks = {}
    for name, entry in units.items():
        if not name.startswith(NOISEPRINT):
            block = name.removesuffix(f", {ATTENTION}")
            blocks[block] = blocks.get(block, True) and entry.get("decision") == "fp16"
    return {block for block, half in blocks.items() if half}


@pytest.mark.parametrize("size", ["256px", "large"])
def test_torch_fp16_plan_in_real_float16_on_cuda(torch_cuda, fp16_model, checkpoint_seed0, size):
    """The plan's centered Noiseprint++ in real float16 (cuDNN) against FP32 on CUDA, beside
    both CPU kernel models of the same plan on the same image; at full size, Noiseprint++'s
    time in FP32 and in the centered FP16 form."""
    torch = torch_cuda
    from trufor_trt.engine.decode import decode_image
    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.benchmarks.conv16_speed import cuda_time_ms
    from trufor_trt.engine.torch_runner import TorchRunner
    from trufor_trt.precision.budgets import FP16_BUDGET
    from trufor_trt.export.measure import output_errors

    variant = ModelDir.open(fp16_model).manifest["variants"]["fp16"]
    plan = variant["fp16_plan"]
    blocks = _blocks_wholly_in_fp16(plan["units"])
    forms, centers = plan["noiseprint_conv_forms"], plan["noiseprint_centers"]
    path = (sorted((IMAGES_DIR / "cocoglide_sample").rglob("*.png"))[0] if size == "256px"
            else LARGE_IMAGE)
    prepared = prepare_input(decode_image(path))
    with TorchRunner(checkpoint_seed0, device="cuda") as runner, torch.no_grad():
        dncnn = runner.network.dncnn
        image = torch.from_numpy(prepared).cuda()
        fp32 = postprocess(runner.infer(prepared), runner.detection_head)
        fp32_ms = cuda_time_ms(torch, lambda: dncnn(image), 5)
        with noiseprint_conv_forms(torch, dncnn, forms, centers):
            noiseprint_only = postprocess(runner.infer(prepared), runner.detection_head)
            fp16_ms = cuda_time_ms(torch, lambda: dncnn(image), 5)
            with fp16_plan_blocks(torch, runner.network, blocks):
                half = postprocess(runner.infer(prepared), runner.detection_head)
    noiseprint_error = output_errors(noiseprint_only, fp32)["np++"]
    simulated = _simulated_noiseprint(fp16_model, prepared, plan)
    errors = output_errors(half, fp32)
    assert all(np.isfinite(value) for value in errors.values()), errors
    record(f"torch cuda fp16 plan {size} {prepared.shape[2]}x{prepared.shape[3]}",
           {"noiseprint_conv_forms": forms, "blocks_in_fp16": sorted(blocks),
            "noiseprint_max_abs_vs_fp32_cuda": noiseprint_error,
            "noiseprint_cpu_simulation_by_kernel_model": simulated,
            "within_2x_of_rounded_output_model": noiseprint_error <= 2 * max(simulated["rounded_output"], 1e-6),
            "noiseprint_ms": {"fp32": fp32_ms, "centered_fp16": fp16_ms},
            "max_abs_vs_fp32": errors, "budget": FP16_BUDGET,
            "within_budget": all(errors[k] <= FP16_BUDGET[k] for k in errors),
            "flops_by_precision": variant["flops_by_precision"]})
    assert noiseprint_error <= FP16_BUDGET["np++"]


def _simulated_noiseprint(model_dir: Path, prepared, plan: dict) -> dict:
    """Noiseprint++'s deviation in the CPU simulation of the same plan, per kernel model."""
    import onnx

    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.export.fp16_plan import NoiseprintMeasure, noiseprint_activations, noiseprint_graph, recorded_plan

    fp32 = onnx.load(ModelDir.open(model_dir).variant_path("fp32"))
    recorded = recorded_plan(fp32, plan)
    graph = noiseprint_graph(fp32)
    measure = NoiseprintMeasure(graph, noiseprint_activations(graph, [prepared]), recorded["centers"])
    return {kernel: errors["np++"]
            for kernel, errors in measure(set(), recorded["conv_forms"])["by_kernel_model"].items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_matches_onnxruntime(tensorrt_ready, tmp_path, fp16_model, precision):
    from trufor_trt.engine.decode import decode_image
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
    from trufor_trt.engine.tensorrt_plan import Profile, Sidecar, sidecar_path
    from trufor_trt.engine.tensorrt_runner import TensorRTRunner
    from trufor_trt.errors import ImageError
    from trufor_trt.export.measure import output_errors
    from trufor_trt.export.tensorrt_build import build_engine
    from trufor_trt.export.variants import add_precision_variant

    model = Path(shutil.copytree(fp16_model, tmp_path / "model"))
    if precision == "int8":
        add_precision_variant(model, "int8", IMAGES_DIR / "cocoglide_sample", on_step=lambda message: None)
    large = decode_image(LARGE_IMAGE)
    path = build_engine(model, precision, Profile(min=(32, 32), opt=(256, 256), max=large.shape[:2]),
                        workspace_gib=8, on_step=lambda message: None)
    if precision != "fp32":  # what `build` does next: validation on this GPU, into the sidecar
        from trufor_trt.engine.model_dir import ModelDir
        from trufor_trt.validate import validate_engine

        validate_engine(ModelDir.open(model), path, None, print)
    sidecar = Sidecar.read(sidecar_path(path))
    assert precision == "fp32" or sidecar.validation is not None
    measured = {}
    with OnnxRuntimeRunner(model) as reference, \
            TensorRTRunner(model, precision=precision, accept_unvalidated=True) as engine:
        for name, rgb in (("61x83", synthetic_image(61, 83, seed=1)), ("large", large)):
            prepared = prepare_input(rgb)
            ours = postprocess(engine.infer(prepared), engine.detection_head)
            truth = postprocess(reference.infer(prepared), reference.detection_head)
            measured[name] = output_errors(ours, truth)
            assert all(np.isfinite(value) for value in measured[name].values()), measured
            assert set(engine.last_stage_ms) == {"host_to_device", "inference", "device_to_host"}
        with pytest.raises(ImageError, match="--max-shape"):
            engine.infer(prepare_input(synthetic_image(large.shape[0] + 8, 64)))
    record(f"tensorrt {precision} vs onnxruntime fp32", {**measured, "validation": sidecar.validation})
    if precision == "fp32":
        from trufor_trt.selftest import BOUNDS

        assert all(measured["61x83"][key] <= bound for key, bound in BOUNDS.items()), measured
    else:  # TensorRT's own float16 kernels (accumulation not promised in FP32) against the budget
        from trufor_trt.precision.budgets import BUDGETS

        budget = BUDGETS[precision]
        assert all(measured[size][key] <= limit for size in measured for key, limit in budget.items()), measured


def test_bench_times_device_stages_of_the_torch_network_on_cuda(torch_cuda, tmp_path, checkpoint_seed0):
    from typer.testing import CliRunner

    from trufor_trt.cli import app

    result = CliRunner().invoke(app, ["bench", "--backend", "torch", "--device", "cuda",
                                      "--checkpoint", str(checkpoint_seed0), "--sizes", "96x128",
                                      "--repeat", "2", "--streams", "2", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert {"host_to_device", "inference", "device_to_host"} <= set(run["single_stream"]["stats_ms"])
    assert run["memory"]["device_peak_bytes"] > 0
    assert "fraction_of_gemm_rate" not in run  # a CPU rate says nothing about a GPU run


@pytest.mark.parametrize("size", [(1024, 1024), (173, 229)], ids=["1024px", "173x229"])
def test_device_postprocessing_on_cuda_equals_the_cpu_postprocessor(torch_cuda, checkpoint_seed0, size):
    """The torch runner's postprocessing on the GPU (its default there) against the CPU
    postprocessor on the same logits; and what each costs at this size."""
    import time

    from trufor_trt.engine.decode import decode_image
    from trufor_trt.engine.runner import FinishedOutputs
    from trufor_trt.engine.torch_runner import TorchRunner

    prepared = prepare_input(np.ascontiguousarray(decode_image(LARGE_IMAGE)[:size[0], :size[1]]))
    with TorchRunner(checkpoint_seed0, device="cuda") as runner:
        runner.postprocess_on_device = False
        raw = runner.infer(prepared)
        start = time.perf_counter()
        cpu = postprocess(raw, runner.detection_head)
        cpu_ms = (time.perf_counter() - start) * 1e3
        runner.postprocess_on_device = True
        finished = runner.infer(prepared)
        device_ms = runner.last_stage_ms["device_postprocess"] + runner.last_stage_ms["device_to_host"]
        ours = postprocess(finished, runner.detection_head)
    assert isinstance(finished, FinishedOutputs) and ours.localization_map.shape == size
    errors = {"map": float(np.max(np.abs(ours.localization_map - cpu.localization_map))),
              "conf": float(np.max(np.abs(ours.confidence_map - cpu.confidence_map))),
              "score": abs(ours.score - cpu.score), "detection_logit": abs(ours.detection_logit - cpu.detection_logit)}
    record(f"torch cuda device postprocess vs CPU postprocess {size[0]}x{size[1]}",
           {**errors, "cpu_postprocess_ms": cpu_ms, "device_postprocess_and_copy_ms": device_ms})
    assert errors["map"] < 1e-5 and errors["conf"] < 1e-5 and errors["score"] < 1e-6, errors


def _batch_against_one_at_a_time(runner, count: int) -> dict:
    """Worst change of each output when `count` same-size images run as one batch."""
    from trufor_trt.export.measure import output_errors

    prepared = [prepare_input(synthetic_image(96, 128, seed=seed)) for seed in range(count)]
    batched = runner.infer_batch(np.concatenate(prepared))
    alone = [runner.infer(image) for image in prepared]
    errors = [output_errors(postprocess(ours, runner.detection_head), postprocess(theirs, runner.detection_head))
              for ours, theirs in zip(batched, alone)]
    return {key: max(error[key] for error in errors) for key in errors[0]}


def test_torch_on_cuda_batches_same_size_images_without_changing_them(torch_cuda, checkpoint_seed0):
    """`analyze --batch` on a GPU: same-size images in one forward pass equal each alone (to
    float32 rounding, which the batch's kernels may order differently)."""
    from trufor_trt.engine.torch_runner import TorchRunner

    with TorchRunner(checkpoint_seed0, device="cuda") as runner:
        assert runner.takes_batches() and runner.batch_limit(96, 128) > 4
        worst = _batch_against_one_at_a_time(runner, 4)
    record("torch cuda batch of 4 vs one at a time", worst)
    assert worst["map"] < 1e-3 and worst["score"] < 1e-3, worst


def test_tensorrt_batch_engine_takes_same_size_images_together(tensorrt_ready, tmp_path, model_seed0):
    from trufor_trt.engine.tensorrt_plan import Profile
    from trufor_trt.engine.tensorrt_runner import TensorRTRunner
    from trufor_trt.export.tensorrt_build import build_engine

    model = Path(shutil.copytree(model_seed0, tmp_path / "model"))
    build_engine(model, "fp32", Profile(min=(32, 32), opt=(96, 128), max=(256, 256), max_batch=4),
                 workspace_gib=8, on_step=lambda message: None)
    with TensorRTRunner(model, precision="fp32") as engine:
        assert engine.takes_batches() and engine.batch_limit(96, 128) == 4
        worst = _batch_against_one_at_a_time(engine, 3)
    record("tensorrt fp32 batch of 3 vs one at a time", worst)
    assert worst["map"] < 1e-3 and worst["score"] < 1e-3, worst


def test_tensorrt_timing_cache_reused_and_a_corrupt_one_replaced_two_runners_share_one_engine(
        tensorrt_ready, tmp_path, model_seed0, monkeypatch):
    """One small FP32 engine built twice (the second time on a truncated timing cache), then two
    runners on two threads under each CUDA layer: one deserialized engine, the same outputs."""
    from trufor_trt.engine.tensorrt_plan import Profile
    from trufor_trt.engine.tensorrt_runner import SHARED_ENGINES, TensorRTRunner
    from trufor_trt.export.tensorrt_build import build_engine

    model = Path(shutil.copytree(model_seed0, tmp_path / "model"))
    cache, profile = tmp_path / "timing.cache", Profile(min=(32, 32), opt=(96, 128), max=(128, 160))
    build_engine(model, "fp32", profile, timing_cache_path=cache, on_step=lambda message: None)
    cache.write_bytes(cache.read_bytes()[:64])
    said = []
    build_engine(model, "fp32", profile, timing_cache_path=cache, on_step=said.append)
    assert any("timing cache is unreadable" in line for line in said) and cache.stat().st_size > 64
    images = [prepare_input(synthetic_image(96, 128, seed=seed)) for seed in range(4)]
    for layer_name in _available_layers():
        monkeypatch.setenv("TRUFOR_TRT_CUDA", layer_name)
        with TensorRTRunner(model, precision="fp32") as first, TensorRTRunner(model, precision="fp32") as second:
            alone = [first.infer(image).noiseprint.copy() for image in images]
            outputs = {}

            def run(runner, key):
                outputs[key] = [runner.infer(image).noiseprint.copy() for image in images]
            threads = [threading.Thread(target=run, args=(runner, key)) for key, runner in (("a", first), ("b", second))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(SHARED_ENGINES._engines) == 1  # two contexts, one engine
        for key in ("a", "b"):
            assert all(np.array_equal(ours, theirs) for ours, theirs in zip(outputs[key], alone)), (layer_name, key)
        assert not SHARED_ENGINES._engines  # released with the last runner


ORIN_NANO_8GB_BYTES = int(7.3 * 2 ** 30)  # what CUDA reports as total on an Orin Nano 8GB


def test_torch_chain_on_cuda_takes_12_mp_in_an_8_gb_jetsons_memory(torch_cuda, checkpoint_seed0, tmp_path):
    """TensorRT's chain (Noiseprint++ and the decoders in bands, the encoder whole) in PyTorch on
    CUDA, under a memory cap as large as an Orin Nano 8GB's whole memory, against the whole image
    at once without the cap: time and peak device memory of each."""
    import time

    torch = torch_cuda
    from trufor_trt.engine.torch_runner import TorchRunner
    from test_large_images import _camera_sized_image

    import cv2

    _camera_sized_image(tmp_path / "camera.png")
    prepared = prepare_input(cv2.imread(str(tmp_path / "camera.png"))[:, :, ::-1])
    results = {}
    total = torch.cuda.get_device_properties(0).total_memory
    for name, budget in (("whole", None), ("chain", ORIN_NANO_8GB_BYTES)):
        torch.cuda.empty_cache()
        if budget:
            torch.cuda.set_per_process_memory_fraction(budget / total)
        try:
            with TorchRunner(checkpoint_seed0, device="cuda", gpu_memory_budget=budget,
                             postprocess_on_device=False) as runner:
                runner.infer(prepared[:, :, :64, :64])  # cuDNN's first call out of the timing
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                raw = runner.infer(prepared)
                seconds = time.perf_counter() - started
                results[name] = (postprocess(raw, runner.detection_head), seconds,
                                 torch.cuda.max_memory_allocated() / 2 ** 30)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    (whole, whole_s, whole_gib), (chain, chain_s, chain_gib) = results["whole"], results["chain"]
    deviation = {"map": float(np.abs(chain.localization_map - whole.localization_map).max()),
                 "np++": float(np.abs(chain.noiseprint - whole.noiseprint).max())}
    record("torch cuda chain 4000x3000 vs whole image", {
        **deviation, "whole_s": round(whole_s, 2), "whole_peak_gib": round(whole_gib, 2),
        "chain_s": round(chain_s, 2), "chain_peak_gib": round(chain_gib, 2),
        "cap_gib": round(ORIN_NANO_8GB_BYTES / 2 ** 30, 2)})
    assert deviation["map"] < 1e-5 and deviation["np++"] < 1e-5, deviation
    assert chain_gib < ORIN_NANO_8GB_BYTES / 2 ** 30
