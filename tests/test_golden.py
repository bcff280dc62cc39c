"""Parity with the official network's float64 outputs, through the path users take:
checkpoint from make_checkpoint.py -> `trufor-trt analyze` (torch, or ONNX Runtime on the
exported model folder) -> .npz files."""

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.batch.provenance import PROVENANCE_KEY
from trufor_trt.cli import app
from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input

from conftest import golden_files, max_abs_error, require_shared, tolerance

GOLDEN = golden_files()
OUTPUT_KEYS = ("map", "conf", "score", "np++")


@pytest.fixture(scope="session")
def golden_inputs(tmp_path_factory):
    """Every golden input written as a lossless PNG."""
    require_shared()
    inputs = tmp_path_factory.mktemp("golden_inputs")
    for path in GOLDEN:
        assert cv2.imwrite(str(inputs / f"{path.stem}.png"), np.load(path)["rgb"][:, :, ::-1])
    return inputs


@pytest.fixture(scope="session", params=["torch", "onnxruntime"])
def analyzed_goldens(request, tmp_path_factory, golden_inputs, checkpoint_seed0):
    """The golden inputs through one `analyze` run per backend."""
    if request.param == "torch":
        source = ["--checkpoint", str(checkpoint_seed0), "--device", "cpu"]
    else:
        source = ["--model", str(request.getfixturevalue("model_seed0"))]
    out = tmp_path_factory.mktemp(f"golden_outputs_{request.param}")
    result = CliRunner().invoke(app, ["analyze", str(golden_inputs), "--out", str(out), *source,
                                      "--backend", request.param, "--save-noiseprint", "--no-png"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("golden_path", GOLDEN, ids=lambda path: path.stem)
@pytest.mark.parametrize("key", OUTPUT_KEYS)
def test_analyze_matches_official_float64_outputs(analyzed_goldens, golden_path, key):
    golden = np.load(golden_path)
    ours = np.load(analyzed_goldens / f"{golden_path.stem}.png.npz")
    assert tuple(ours["imgsize"]) == golden["rgb"].shape[:2]
    error = max_abs_error(ours[key], golden, key)
    assert error <= tolerance(golden, key), f"{key}: {error:.3g} > {tolerance(golden, key):.3g}"


def test_npz_has_the_official_keys_and_only_the_provenance_beside_them(analyzed_goldens):
    ours = np.load(analyzed_goldens / f"{GOLDEN[0].stem}.png.npz")
    assert sorted(ours.files) == sorted(["map", "conf", "score", "imgsize", "np++", PROVENANCE_KEY])
    assert ours["map"].dtype == np.float32 and ours["conf"].dtype == np.float32
    assert ours["score"].shape == ()


def test_float64_network_reproduces_the_golden_logits(reference_runner):
    """In float64 our network is the official one to the goldens' float32 storage precision:
    any wrong layer, eps or ordering would show here far above 1e-5."""
    golden = np.load(min(GOLDEN, key=lambda path: path.stat().st_size))
    raw = reference_runner.infer(prepare_input(golden["rgb"], dtype=np.float64))
    torch = pytest.importorskip("torch")
    logits = torch.from_numpy(np.concatenate([raw.localization_logits, raw.confidence_logits]))[None]
    localization, (confidence,) = np.split(torch.nn.functional.interpolate(
        logits, size=golden["rgb"].shape[:2], mode="bilinear", align_corners=False)[0].numpy(), [2])
    assert np.max(np.abs(localization - golden["anomaly_logits"])) < 1e-5
    assert np.max(np.abs(confidence - golden["confidence_logits"])) < 1e-5
    assert np.max(np.abs(raw.noiseprint - golden["noiseprint"])) < 1e-5
    analysis = postprocess(raw, reference_runner.detection_head)
    assert abs(analysis.detection_logit - float(golden["detection_logit"])) < 1e-5
