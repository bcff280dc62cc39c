"""`trufor-trt selftest`: prove an installation end to end, without the official weights.

A seeded random checkpoint in the official format (the network's own random init), exported
and verified, then synthetic images of odd sizes through the chosen backend exactly as
`analyze` runs them (PNG file -> decode -> prepare -> infer -> postprocess), each compared with
the PyTorch network computed in float64. Needs torch (for the checkpoint and the reference).
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .batch.analyze import analyse_file
from .engine import create_runner
from .engine.postprocess import Analysis, postprocess
from .engine.preprocess import prepare_input
from .engine.timing import StageClock
from .export.synthetic import synthetic_image

SELFTEST_SIZES = ((45, 67), (61, 83), (97, 130))
# The core issue's floors on the published outputs (max abs).
BOUNDS = {"map": 1e-3, "conf": 5e-4, "score": 3e-4, "np++": 4e-3}


@dataclass
class ImageCheck:
    size: tuple
    deviations: dict
    times_ms: dict

    @property
    def passed(self) -> bool:
        return all(self.deviations[name] <= bound for name, bound in BOUNDS.items())


@dataclass
class SelftestReport:
    backend: str
    setup_ms: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def worst(self) -> dict:
        return {name: max(check.deviations[name] for check in self.checks) for name in BOUNDS}


def _random_value(name: str, like, generator):
    """PyTorch's default init leaves every output almost constant (a test that could not
    fail); these draws give realistic ranges: fan-in scaled weights, norms near 1, BatchNorm
    statistics away from the identity."""
    import torch

    def normal(std, mean=0.0):
        return torch.randn(like.shape, generator=generator) * std + mean

    if name.endswith("running_var"):
        return torch.rand(like.shape, generator=generator) + 0.5
    if name.endswith("running_mean"):
        return normal(0.1)
    if name.endswith("weight") and like.dim() >= 2:
        return normal(like[0].numel() ** -0.5)
    if name.endswith("weight"):
        return normal(0.1, mean=1.0)
    return normal(0.05)


def write_random_checkpoint(path: Path, seed: int) -> None:
    """The official file layout ({"state_dict": ...}) with seeded random weights."""
    import torch

    from .model import TruFor

    generator = torch.Generator().manual_seed(seed)
    state = {name: value if not value.is_floating_point() else _random_value(name, value, generator)
             for name, value in TruFor().state_dict().items()}
    torch.save({"epoch": 0, "state_dict": state}, path)


def analysis_deviations(ours: Analysis, reference: Analysis) -> dict:
    def worst(left, right):
        return float(np.max(np.abs(np.asarray(left, np.float64) - np.asarray(right, np.float64))))

    return {"map": worst(ours.localization_map, reference.localization_map),
            "conf": worst(ours.confidence_map, reference.confidence_map),
            "score": worst(ours.score, reference.score),
            "np++": worst(ours.noiseprint, reference.noiseprint)}


def _prepare_model(backend: str, checkpoint: Path, scratch: Path, clock: StageClock):
    from .export.bundle import export_model_dir

    if backend == "torch":
        return None
    with clock.stage("export"):
        export_model_dir(checkpoint, scratch / "model", on_step=lambda message: None)
    return scratch / "model"


def run_selftest(backend: str, seed: int = 0, on_step=print) -> SelftestReport:
    from .export.verify import float64_reference
    from .model import load_trufor

    report = SelftestReport(backend=backend)
    clock = StageClock(report.setup_ms)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        checkpoint = scratch / "random.pth.tar"
        on_step(f"writing a random checkpoint (seed {seed})")
        with clock.stage("checkpoint"):
            write_random_checkpoint(checkpoint, seed)
        on_step("exporting and verifying the ONNX graphs" if backend != "torch" else "loading")
        model = _prepare_model(backend, checkpoint, scratch, clock)
        reference = float64_reference(load_trufor(checkpoint))
        runner = create_runner(backend, checkpoint=checkpoint, model=model, device="cpu")
        with clock.stage("load"):
            runner.load()
        try:
            for index, (height, width) in enumerate(SELFTEST_SIZES):
                on_step(f"image {width}x{height} through {backend}")
                rgb = synthetic_image(height, width, seed=seed + index)
                path = scratch / f"synthetic_{index}.png"
                cv2.imwrite(str(path), rgb[:, :, ::-1])
                image_clock = StageClock()
                _, ours = analyse_file(path, runner, image_clock)
                truth = postprocess(reference(prepare_input(rgb, np.float64)), runner.detection_head)
                report.checks.append(ImageCheck((height, width), analysis_deviations(ours, truth),
                                                image_clock.times_ms))
        finally:
            runner.close()
    return report
