"""On an NVIDIA GPU only: the CUDA layer, TensorRT engines and the PyTorch network on CUDA.
Elsewhere every test here is skipped with its reason (no mocks stand in for them)."""

import importlib.util

import numpy as np
import pytest

from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.export.synthetic import synthetic_image

from conftest import golden_files, max_abs_error, tolerance

pytestmark = pytest.mark.gpu


def _cuda_driver():
    if importlib.util.find_spec("pycuda") is None:
        pytest.skip("pycuda is not installed (no CUDA here)")
    import pycuda.driver as cuda

    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA GPU on this machine")
    except cuda.Error as exc:
        pytest.skip(f"no usable CUDA driver: {exc}")
    return cuda


def _tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed on this machine")
    _cuda_driver()


def test_cuda_layer_pinned_async_copies_events_and_two_streams():
    _cuda_driver()
    from trufor_trt.engine.cuda import PrimaryContext

    with PrimaryContext() as context, context.current() as cuda:
        streams = [cuda.Stream(), cuda.Stream()]
        sources = [np.arange(1 << 20, dtype=np.float32) * (k + 1) for k in range(2)]
        pinned = [cuda.pagelocked_empty(source.size, np.float32) for source in sources]
        back = [cuda.pagelocked_empty(source.size, np.float32) for source in sources]
        device = [cuda.mem_alloc(source.nbytes) for source in sources]
        start, end = cuda.Event(), cuda.Event()
        start.record(streams[0])
        for k, stream in enumerate(streams):
            np.copyto(pinned[k], sources[k])
            cuda.memcpy_htod_async(device[k], pinned[k], stream)
            cuda.memcpy_dtoh_async(back[k], device[k], stream)
        end.record(streams[0])
        for stream in streams:
            stream.synchronize()
        assert end.time_since(start) >= 0
        for k in range(2):
            np.testing.assert_array_equal(back[k], sources[k])
            device[k].free()


@pytest.mark.parametrize("precision", ["fp32"])
def test_tensorrt_engine_matches_onnxruntime(tmp_path, model_seed0, precision):
    import shutil

    _tensorrt()
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
    from trufor_trt.engine.tensorrt_plan import Profile
    from trufor_trt.engine.tensorrt_runner import TensorRTRunner
    from trufor_trt.errors import ImageError
    from trufor_trt.export.tensorrt_build import build_engine
    from trufor_trt.export.verify import BOUNDS, raw_deviation

    model = shutil.copytree(model_seed0, tmp_path / "model")
    build_engine(model, precision, Profile(min=(32, 32), opt=(96, 128), max=(160, 160)),
                 workspace_gib=2, on_step=lambda message: None)
    with OnnxRuntimeRunner(model) as reference, TensorRTRunner(model, precision=precision) as engine:
        for height, width in [(61, 83), (160, 157), (32, 40)]:
            prepared = prepare_input(synthetic_image(height, width, seed=height))
            errors = raw_deviation(engine.infer(prepared), reference.infer(prepared))
            assert all(errors[name] <= BOUNDS[name] for name in errors), errors
            assert set(engine.last_stage_ms) == {"host_to_device", "inference", "device_to_host"}
        with pytest.raises(ImageError, match="--max-shape 200x160"):
            engine.infer(prepare_input(synthetic_image(200, 100)))


@pytest.mark.parametrize("golden_path", golden_files(), ids=lambda path: path.stem)
def test_torch_network_on_cuda_matches_the_goldens(checkpoint_seed0, golden_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")
    from trufor_trt.engine.postprocess import postprocess
    from trufor_trt.engine.torch_runner import TorchRunner

    golden = np.load(golden_path)
    with TorchRunner(checkpoint_seed0, device="cuda") as runner:
        analysis = postprocess(runner.infer(prepare_input(golden["rgb"])), runner.detection_head)
    for key, ours in (("map", analysis.localization_map), ("conf", analysis.confidence_map),
                      ("score", analysis.score), ("np++", analysis.noiseprint)):
        assert max_abs_error(ours, golden, key) <= tolerance(golden, key)


def test_bench_times_device_stages_of_the_torch_network_on_cuda(tmp_path, checkpoint_seed0):
    import json

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")
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
