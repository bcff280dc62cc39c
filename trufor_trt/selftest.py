"""`trufor-trt selftest`: prove an installation end to end, without the official weights.

The seeded random checkpoint in the official format that `bench` and `analyze --random-weights`
share (export/cache.py), its model exported and verified once into the cache, then synthetic
images of odd sizes through the chosen backend exactly as `analyze` runs them (PNG file ->
decode -> prepare -> infer -> postprocess), each compared with the PyTorch network computed in
float64. Needs torch (for the checkpoint and the reference).
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from trufor_trt.batch.analyze import analyse_file
from trufor_trt.engine import create_runner
from trufor_trt.engine.postprocess import postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.timing import StageClock
from trufor_trt.errors import TruforError
from trufor_trt.export.cache import RANDOM_SEED, random_checkpoint
from trufor_trt.export.measure import output_errors
from trufor_trt.export.synthetic import synthetic_image

SELFTEST_SIZES = ((45, 67), (61, 83), (97, 130))
# The faithfulness floors on the published outputs (max abs).
BOUNDS = {"map": 1e-3, "conf": 5e-4, "score": 3e-4, "np++": 4e-3}


@dataclass
class ImageCheck:
    size: tuple
    deviations: dict
    times_ms: dict
    bounds: dict = field(default_factory=lambda: BOUNDS)

    @property
    def passed(self) -> bool:
        return all(self.deviations[name] <= bound for name, bound in self.bounds.items())


@dataclass
class SelftestReport:
    backend: str
    precision: str = "fp32"
    setup_ms: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def worst(self) -> dict:
        return {name: max(check.deviations[name] for check in self.checks) for name in BOUNDS}


SELFTEST_PROFILE = ((32, 32), (96, 128), (160, 160))  # covers SELFTEST_SIZES, builds fast


def _write_calibration_images(folder: Path, seed: int) -> Path:
    folder.mkdir()
    for index, (height, width) in enumerate(SELFTEST_SIZES):
        cv2.imwrite(str(folder / f"calibration_{index}.png"),
                    synthetic_image(height, width, seed=seed + 100 + index)[:, :, ::-1])
    return folder


def _prepare_model(backend: str, precision: str, checkpoint: Path, scratch: Path, clock: StageClock,
                   seed: int, on_step):
    """The model folder the backend runs (none for torch); for TensorRT, with its engine. The
    export's own steps are said (a minute of silence reads as a hang)."""
    from trufor_trt.export.bundle import export_model_dir
    from trufor_trt.export.cache import cached_model_dir

    if backend == "torch":
        return None

    def indented(message: str) -> None:
        on_step(f"  {message}")

    if backend == "onnxruntime" and precision == "fp32":  # the cache's folder, shared with bench and the demo
        with clock.stage("export"):
            return cached_model_dir(checkpoint, on_step=indented).path
    with clock.stage("export"):
        export_model_dir(checkpoint, scratch / "model", on_step=indented, with_tensorrt=True)
    if precision != "fp32":
        from trufor_trt.export.variants import add_precision_variant

        calibration = _write_calibration_images(scratch / "calibration", seed)
        # INT8 is planned on top of the FP16 plan.
        for variant in ("fp16", "int8") if precision == "int8" else (precision,):
            with clock.stage(f"{variant} variant"):
                add_precision_variant(scratch / "model", variant, calibration, on_step=lambda message: None)
    if backend == "tensorrt":
        from trufor_trt.engine.tensorrt_plan import Profile
        from trufor_trt.export.tensorrt_build import build_engine

        with clock.stage("engine build"):
            build_engine(scratch / "model", precision, Profile(*SELFTEST_PROFILE),
                         on_step=lambda message: None)
    return scratch / "model"


def bounds_for(precision: str) -> dict:
    """FP32 backends: the core floors. FP16: the budget its variant was planned against."""
    if precision == "fp16":
        from trufor_trt.precision.budgets import FP16_BUDGET

        return FP16_BUDGET
    return BOUNDS


def run_selftest(backend: str, precision: str = "fp32", seed: int = 0, on_step=print) -> SelftestReport:
    from trufor_trt.export.verify import float64_reference
    from trufor_trt.model import load_trufor

    if precision == "int8":
        raise TruforError("selftest proves fp32 and fp16; judge int8 on real images with "
                          "`trufor-trt validate --precision int8 --images DIR`")
    if backend == "tensorrt":  # say what is missing before minutes of export
        from trufor_trt.engine.cuda_layer import gpu_info
        from trufor_trt.engine.tensorrt_plan import build_settings
        from trufor_trt.engine.tensorrt_start import import_tensorrt

        build_settings(import_tensorrt().__version__)
        gpu_info()
    report = SelftestReport(backend=backend, precision=precision)
    clock = StageClock(report.setup_ms)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        on_step(f"random checkpoint (seed {seed}; bench and --random-weights use seed {RANDOM_SEED}'s too)")
        with clock.stage("checkpoint"):
            checkpoint = random_checkpoint(seed)
        on_step("the ONNX graphs, exported and verified (or the cache's)" if backend != "torch" else "loading")
        model = _prepare_model(backend, precision, checkpoint, scratch, clock, seed, on_step)
        reference = float64_reference(load_trufor(checkpoint))
        # its engine is unvalidated: this run is its measurement, against float64
        runner = create_runner(backend, checkpoint=checkpoint, model=model, device="cpu",
                               precision=precision, accept_unvalidated=True)
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
                report.checks.append(ImageCheck((height, width), output_errors(ours, truth),
                                                image_clock.times_ms, bounds_for(precision)))
        finally:
            runner.close()
    return report


def selftest_table(report):
    """The checks as `trufor-trt selftest` prints them (a rich Table)."""
    from rich.table import Table

    table = Table(title=f"selftest: {report.backend} {report.precision} vs the float64 PyTorch "
                        "network (max abs)")
    table.add_column("image")
    for name, bound in bounds_for(report.precision).items():
        table.add_column(f"{name} (<= {bound:g})", justify="right")
    table.add_column("ms: decode / infer / post", justify="right")
    for check in report.checks:
        times = check.times_ms
        table.add_row(f"{check.size[1]}x{check.size[0]}",
                      *(f"{check.deviations[name]:.2e}" for name in check.bounds),
                      f"{times['decode']:.0f} / {times['inference']:.0f} / {times['postprocess']:.0f}")
    return table
