"""The CPU postprocessor: numpy only, equal to the official network's own tail."""

import subprocess
import sys

import numpy as np
import pytest

from trufor_trt.engine.postprocess import (DetectionHead, analysis_from_full_logits, detection_features,
                                           upsample_bilinear)
from trufor_trt.engine.runner import RawOutputs
from trufor_trt.engine.postprocess import postprocess

from conftest import golden_files, max_abs_error, tolerance


def _logsumexp(values: np.ndarray) -> float:
    peak = values.max()
    return float(peak + np.log(np.sum(np.exp(values - peak))))


def official_features(evidence: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """The official confpool statistics, written plainly in float64: the oracle."""
    def statistics(values, log_weights):
        log_weights = log_weights - _logsumexp(log_weights)
        weights = np.exp(log_weights)
        return [-_logsumexp(log_weights - values), _logsumexp(log_weights + values),
                np.sum(weights * values), np.sum(weights * values ** 2)]

    evidence, confidence = evidence.ravel().astype(np.float64), confidence.ravel().astype(np.float64)
    return np.array(statistics(confidence, np.zeros_like(confidence))
                    + statistics(evidence, -np.logaddexp(0.0, -confidence)))


@pytest.mark.parametrize("small, large", [((8, 8), (29, 31)), ((64, 96), (256, 384)),
                                          ((44, 58), (173, 229)), ((5, 7), (5, 7)), ((9, 3), (35, 12)),
                                          ((256, 256), (1024, 1024))])
def test_upsampling_equals_torch_interpolate(small, large):
    torch = pytest.importorskip("torch", reason="the reference interpolation is PyTorch's")
    F = torch.nn.functional
    planes = np.random.default_rng(1).normal(size=(3, *small)) * 10
    ours = upsample_bilinear(planes, *large)
    theirs = F.interpolate(torch.from_numpy(planes)[None], size=large, mode="bilinear",
                           align_corners=False)[0].numpy()
    assert ours.shape == (3, *large) and ours.dtype == np.float32
    # float32 rounding of values up to ~50: a wrong tap or weight would be off by ~1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_pooled_features_equal_the_float64_statistics(scale):
    """Float32 terms, float64 sums: within 1e-6 relative of the float64 statistics, also where
    the weights span hundreds of e-folds (float32 exponentials of the raw values would underflow)."""
    rng = np.random.default_rng(7)
    evidence = (rng.standard_normal((300, 200)) * scale).astype(np.float32)
    confidence = (rng.standard_normal((300, 200)) * scale - scale / 2).astype(np.float32)
    ours, truth = detection_features(evidence, confidence), official_features(evidence, confidence)
    np.testing.assert_allclose(ours, truth, rtol=1e-6, atol=1e-6 * scale)


def test_one_dominant_weight_makes_every_statistic_its_pixel_value():
    evidence = np.array([[3.0, -2.0, 7.0]], np.float32)
    confidence = np.array([[-200.0, -200.0, 60.0]], np.float32)
    np.testing.assert_allclose(detection_features(evidence, confidence)[4:], [7.0, 7.0, 7.0, 49.0], rtol=1e-6)


def test_maps_are_finite_for_extreme_logits():
    localization = np.array([[[1000.0, -1000.0]], [[-1000.0, 1000.0]]])
    confidence = np.array([[-1000.0, 1000.0]])
    head = DetectionHead(np.zeros((128, 8)), np.zeros(128), np.zeros((1, 128)), np.zeros(1))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is right
        analysis = analysis_from_full_logits(localization, confidence, np.zeros((1, 2)), head)
    np.testing.assert_array_equal(analysis.localization_map, [[0.0, 1.0]])
    np.testing.assert_array_equal(analysis.confidence_map, [[0.0, 1.0]])
    assert analysis.score == 0.5


@pytest.fixture(scope="module")
def head_seed0(checkpoint_seed0):
    pytest.importorskip("torch", reason="the detection head's weights are read from a checkpoint with torch")
    from trufor_trt.model import detection_head_arrays, load_trufor

    return DetectionHead(**detection_head_arrays(load_trufor(checkpoint_seed0)))


@pytest.mark.parametrize("golden_path", golden_files(), ids=lambda path: path.stem)
def test_tail_on_official_logits_gives_official_outputs(golden_path, head_seed0):
    """From the official full-size logits, our softmax, sigmoid, pooling and MLP give the
    official map, conf, detection logit and score."""
    golden = np.load(golden_path)
    analysis = analysis_from_full_logits(golden["anomaly_logits"], golden["confidence_logits"],
                                         golden["noiseprint"], head_seed0)
    assert abs(analysis.detection_logit - float(golden["detection_logit"])) < 2e-5
    assert max_abs_error(analysis.localization_map, golden, "map") < 1e-6
    assert max_abs_error(analysis.confidence_map, golden, "conf") < 1e-6
    assert max_abs_error(analysis.score, golden, "score") < tolerance(golden, "score") / 10


def test_postprocess_shapes_follow_the_noiseprint_grid(head_seed0):
    raw = RawOutputs(localization_logits=np.zeros((2, 8, 10), np.float32),
                     confidence_logits=np.zeros((1, 8, 10), np.float32),
                     noiseprint=np.zeros((31, 37), np.float32))
    analysis = postprocess(raw, head_seed0)
    assert analysis.localization_map.shape == (31, 37) == analysis.confidence_map.shape
    assert analysis.localization_map.dtype == np.float32


def test_postprocessor_imports_no_torch():
    code = ("import sys, trufor_trt.engine.postprocess, trufor_trt.engine.decode, trufor_trt.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


SCORE_UNDER_THREADS = """
import numpy as np
from trufor_trt.engine.postprocess import DetectionHead, postprocess
from trufor_trt.engine.runner import RawOutputs
rng = np.random.default_rng(0)
head = DetectionHead(rng.standard_normal((128, 8)), rng.standard_normal(128), rng.standard_normal((1, 128)),
                     rng.standard_normal(1))
raw = RawOutputs(rng.standard_normal((2, 384, 512)).astype(np.float32),
                 rng.standard_normal((1, 384, 512)).astype(np.float32),
                 rng.standard_normal((1536, 2048)).astype(np.float32))
print(postprocess(raw, head).score.hex())
"""


def test_the_score_has_the_same_bits_whatever_the_thread_settings():
    """Ray workers run with OMP_NUM_THREADS=1: BLAS would sum the score's products in another
    order there, and the same image would get another last bit than under `analyze`."""
    scores = set()
    for threads in ("1", "2"):
        environment = {"PATH": "/usr/bin:/bin", **{name: threads for name in (
            "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        result = subprocess.run([sys.executable, "-c", SCORE_UNDER_THREADS], capture_output=True, text=True,
                                env=environment, check=True)
        scores.add(result.stdout.strip())
    assert len(scores) == 1, scores


def test_device_postprocessing_equals_the_cpu_postprocessor(head_seed0):
    """engine/device_postprocess.py's formulas (run here on PyTorch's CPU; test_gpu.py runs
    them on CUDA) against the numpy postprocessor, on a batch of two different images."""
    torch = pytest.importorskip("torch")
    from trufor_trt.engine.device_postprocess import finish_batch, to_host

    rng = np.random.default_rng(11)
    localization = (rng.standard_normal((2, 2, 43, 61)) * 4).astype(np.float32)
    confidence = (rng.standard_normal((2, 1, 43, 61)) * 4).astype(np.float32)
    noiseprint = rng.standard_normal((2, 1, 171, 243)).astype(np.float32)
    finished = to_host(finish_batch(*(torch.from_numpy(array) for array in (localization, confidence, noiseprint))))
    for index, outputs in enumerate(finished):
        ours = postprocess(outputs, head_seed0)
        cpu = postprocess(RawOutputs(localization[index], confidence[index], noiseprint[index, 0]), head_seed0)
        assert ours.localization_map.shape == (171, 243) and ours.localization_map.dtype == np.float32
        np.testing.assert_allclose(ours.localization_map, cpu.localization_map, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.confidence_map, cpu.confidence_map, rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs.detection_features, detection_features(
            *_full_size(localization[index], confidence[index], (171, 243))), rtol=1e-6)
        assert abs(ours.score - cpu.score) < 1e-6
        np.testing.assert_array_equal(ours.noiseprint, noiseprint[index, 0])


def _full_size(localization, confidence, size):
    upsampled = upsample_bilinear(np.concatenate([localization, confidence]), *size)
    return upsampled[1] - upsampled[0], upsampled[2]
