"""The ONNX Runtime runner, the export cache behind `analyze --checkpoint`, and `selftest`."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="these tests export their model folder: torch (the export extra)")

from trufor_trt import selftest
from trufor_trt.cli import app
from trufor_trt.engine.model_dir import VARIANTS, ModelDir
from trufor_trt.files import sha256_file
from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.runner import RawOutputs
from trufor_trt.engine.torch_runner import TorchRunner
from trufor_trt.export.synthetic import synthetic_image
from trufor_trt.export.verify import BOUNDS, float64_reference, raw_deviation
from trufor_trt.model import load_trufor

from conftest import IMAGES_DIR


def test_one_session_serves_three_sizes(model_seed0, checkpoint_seed0):
    """Dynamic shapes: the smallest legal image, an odd one and a portrait one, one session."""
    reference = float64_reference(load_trufor(checkpoint_seed0))
    with OnnxRuntimeRunner(model_seed0) as runner:
        for height, width in [(29, 29), (61, 83), (100, 75)]:
            prepared = prepare_input(synthetic_image(height, width, seed=height))
            raw = runner.infer(prepared)
            grid = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
            assert raw.localization_logits.shape == (2, *grid)
            assert raw.confidence_logits.shape == (1, *grid)
            assert raw.noiseprint.shape == (height, width)
            for output, error in raw_deviation(raw, reference(prepared)).items():
                assert error <= BOUNDS[output], (height, width, output, error)


def test_onnxruntime_runner_needs_no_torch(model_seed0):
    code = ("import sys, numpy as np\n"
            "from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner\n"
            f"runner = OnnxRuntimeRunner({str(model_seed0)!r}); runner.load()\n"
            "raw = runner.infer(np.full((1, 3, 32, 40), 0.5, np.float32))\n"
            "assert raw.noiseprint.shape == (32, 40) and runner.detection_head is not None\n"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _analyze_from_checkpoint(checkpoint, out):
    return CliRunner().invoke(app, ["analyze", str(IMAGES_DIR / "pristine1.jpg"), "--out", str(out),
                                    "--checkpoint", str(checkpoint), "--backend", "auto", "--no-png"])


def test_a_photo_given_as_checkpoint_is_refused_before_any_export_is_announced(tmp_path, isolated_cache):
    """Issue 41: `--checkpoint photo.jpg` announced an export, then said it was no checkpoint."""
    refused = _analyze_from_checkpoint(IMAGES_DIR / "pristine1.jpg", tmp_path / "out")
    assert refused.exit_code == 2, refused.output
    assert "not a readable PyTorch checkpoint" in refused.output and "exporting" not in refused.output
    assert not (isolated_cache / "models").exists() or not any((isolated_cache / "models").iterdir())


@pytest.mark.slow
def test_checkpoint_is_exported_once_then_reused_and_a_corrupt_cache_rebuilt(
        tmp_path, isolated_cache, model_seed0, checkpoint_seed0):
    import shutil

    cached = isolated_cache / "models" / sha256_file(checkpoint_seed0)[:16]
    shutil.copytree(model_seed0, cached)  # as if a first run had exported it
    reused = _analyze_from_checkpoint(checkpoint_seed0, tmp_path / "first")
    assert reused.exit_code == 0, reused.output
    assert "exporting" not in reused.output
    first = np.load(tmp_path / "first" / "pristine1.jpg.npz")

    graph = cached / VARIANTS[1].file
    graph.write_bytes(graph.read_bytes()[:1000])
    rebuilt = _analyze_from_checkpoint(checkpoint_seed0, tmp_path / "second")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "rebuilding the cached model" in rebuilt.output and "does not match" in rebuilt.output
    second = np.load(tmp_path / "second" / "pristine1.jpg.npz")
    np.testing.assert_array_equal(first["map"], second["map"])
    assert not [path for path in cached.parent.iterdir() if path.name.startswith(".")]
    if importlib.util.find_spec("tensorrt") is None:  # the cache keeps what this machine runs
        rebuilt_files = {path.name for path in cached.iterdir()}
        assert VARIANTS[0].file not in rebuilt_files and VARIANTS[1].file in rebuilt_files
        assert "fp32" not in ModelDir.open(cached).manifest["variants"]

    listed = CliRunner().invoke(app, ["cache", "list"])
    assert listed.exit_code == 0 and str(cached) in listed.output and "model folder: ok" in listed.output
    cleaned = CliRunner().invoke(app, ["cache", "clean"])
    assert cleaned.exit_code == 0 and "freed" in cleaned.output and not cached.exists()


def test_selftest_fails_when_a_backend_is_wrong(monkeypatch):
    """A backend whose localization logits are off by 0.05 must not pass."""
    honest = TorchRunner.infer

    def off_by_a_little(self, prepared):
        raw = honest(self, prepared)
        return RawOutputs(raw.localization_logits + np.array([0.0, 0.05])[:, None, None],
                          raw.confidence_logits, raw.noiseprint)

    monkeypatch.setattr(TorchRunner, "infer", off_by_a_little)
    report = selftest.run_selftest("torch", on_step=lambda message: None)
    assert not report.passed
    assert report.worst()["map"] > selftest.BOUNDS["map"]
