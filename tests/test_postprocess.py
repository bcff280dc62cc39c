"""The CPU postprocessor: numpy only, equal to the official network's own tail."""

import math
import subprocess
import sys

import numpy as np
import pytest

from trufor_trt.engine.postprocess import (DetectionHead, analysis_from_full_logits,
                                           upsample_bilinear, weighted_statistics)
from trufor_trt.engine.runner import RawOutputs
from trufor_trt.engine.postprocess import postprocess

from conftest import golden_files, max_abs_error, tolerance


@pytest.mark.parametrize("small, large", [((8, 8), (29, 31)), ((64, 96), (256, 384)),
                                          ((44, 58), (173, 229)), ((5, 7), (5, 7)), ((9, 3), (35, 12))])
def test_upsampling_equals_torch_interpolate(small, large):
    torch = pytest.importorskip("torch", reason="the reference interpolation is PyTorch's")
    F = torch.nn.functional
    planes = np.random.default_rng(1).normal(size=(3, *small))
    ours = upsample_bilinear(planes, *large)
    theirs = F.interpolate(torch.from_numpy(planes)[None], size=large, mode="bilinear",
                           align_corners=False)[0].numpy()
    assert ours.shape == (3, *large)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_weighted_statistics_on_known_values():
    values = np.array([0.0, 1.0])
    stats = weighted_statistics(values, np.zeros(2))
    expected = [-math.log((1 + math.exp(-1)) / 2), math.log((1 + math.e) / 2), 0.5, 0.5]
    np.testing.assert_allclose(stats, expected, rtol=1e-12)


def test_weighted_statistics_follow_the_weights():
    """A dominant log-weight makes every statistic that pixel's value."""
    values = np.array([3.0, -2.0, 7.0])
    stats = weighted_statistics(values, np.array([0.0, 0.0, 800.0]))
    np.testing.assert_allclose(stats, [7.0, 7.0, 7.0, 49.0], rtol=1e-12)


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
