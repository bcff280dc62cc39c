"""`trufor-trt validate`: how far one engine or graph variant lands from the FP32 reference.

Per image: max and mean abs error of `map` and `conf`, the score error, the max abs error of
Noiseprint++ (`np++`), and whether the decision at 0.5 flipped; per image size: the worst of
each and the flips; overall: the worst of each, the mean of the means, the flips; and the
variant's FLOPs per precision, as its manifest records them. The reference is the model
folder's FP32 graph in ONNX Runtime. An FP16 / INT8 variant simulated in ONNX Runtime is
measured once per kernel model (precision/kernel_models.py): one report each.
"""

import io
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from trufor_trt.batch.inputs import expand_inputs
from trufor_trt.engine import create_runner
from trufor_trt.engine.decode import decode_image
from trufor_trt.engine.postprocess import decision_flipped, postprocess
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.export.synthetic import synthetic_image
from trufor_trt.engine.tensorrt_plan import Sidecar, sidecar_path, validation_record
from trufor_trt.files import write_atomically
from trufor_trt.precision.budgets import BUDGETS

SYNTHETIC_SIZES = ((256, 256), (173, 229), (384, 256))


@dataclass
class ImageReport:
    image: str
    size: str  # HxW
    map_max: float
    map_mean: float
    conf_max: float
    conf_mean: float
    score_error: float
    noiseprint_max: float
    score: float
    reference_score: float
    flipped: bool


@dataclass
class ValidationReport:
    backend: str
    precision: str
    kernel_model: str = ""  # how float16 convolutions were simulated ("" where none were)
    images: list = field(default_factory=list)
    flops_by_precision: list = field(default_factory=list)  # the manifest's record, per size

    def by_size(self) -> dict:
        """HxW -> the worst of each error and the flips on the images of that size."""
        sizes = {}
        for report in self.images:
            sizes.setdefault(report.size, []).append(report)
        ordered = sorted(sizes.items(), key=lambda item: _pixels(item[0]))
        return {size: {"images": len(reports), "map_max": max(r.map_max for r in reports),
                       "conf_max": max(r.conf_max for r in reports),
                       "score_error_max": max(r.score_error for r in reports),
                       "noiseprint_max": max(r.noiseprint_max for r in reports),
                       "decisions_flipped": sum(r.flipped for r in reports)} for size, reports in ordered}

    def overall(self) -> dict:
        return {"images": len(self.images),
                "map_max": max(r.map_max for r in self.images),
                "map_mean": float(np.mean([r.map_mean for r in self.images])),
                "conf_max": max(r.conf_max for r in self.images),
                "conf_mean": float(np.mean([r.conf_mean for r in self.images])),
                "score_error_max": max(r.score_error for r in self.images),
                "noiseprint_max": max(r.noiseprint_max for r in self.images),
                "decisions_flipped": sum(r.flipped for r in self.images)}

    @property
    def label(self) -> str:
        return f"{self.precision} ({self.kernel_model} kernels)" if self.kernel_model else self.precision

    def to_json(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "kernel_model": self.kernel_model,
                "reference": "fp32, onnxruntime",
                "overall": self.overall(), "by_size": self.by_size(),
                "flops_by_precision": self.flops_by_precision,
                "per_image": [asdict(report) for report in self.images]}


def _pixels(size: str) -> int:
    height, width = (int(value) for value in size.split("x"))
    return height * width


def _images(folder):
    if folder is None:
        return [(f"synthetic {h}x{w}", synthetic_image(h, w, seed=index))
                for index, (h, w) in enumerate(SYNTHETIC_SIZES)]
    return [(str(job.path), decode_image(job.path)) for job in expand_inputs([str(folder)])]


def _errors(ours: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Abs errors, where a non-finite output (an overflow) counts as an infinite error."""
    error = np.abs(ours.astype(np.float64) - truth)
    return np.where(np.isfinite(error), error, np.inf)


def compare(name: str, ours, reference) -> ImageReport:
    map_error = _errors(ours.localization_map, reference.localization_map)
    conf_error = _errors(ours.confidence_map, reference.confidence_map)
    noiseprint_error = _errors(ours.noiseprint, reference.noiseprint)
    finite = bool(np.isfinite(ours.score))
    flipped = decision_flipped(ours.score, reference.score)
    size = "x".join(str(side) for side in np.shape(reference.localization_map)[:2])
    return ImageReport(image=name, size=size, map_max=float(map_error.max()), map_mean=float(map_error.mean()),
                       conf_max=float(conf_error.max()), conf_mean=float(conf_error.mean()),
                       score_error=abs(ours.score - reference.score) if finite else float("inf"),
                       noiseprint_max=float(noiseprint_error.max()),
                       score=ours.score, reference_score=reference.score, flipped=flipped)


def _kernel_models(backend: str, precision: str) -> tuple:
    """The kernel models a candidate is measured under: each, where ONNX Runtime simulates float16."""
    from trufor_trt.precision.kernel_models import KERNEL_MODELS

    return KERNEL_MODELS if backend == "onnxruntime" and precision != "fp32" else ("",)


def validate(model, candidates: list, images=None, on_image=None, checkpoint=None, runner_options=None) -> list:
    """One ValidationReport per (backend, precision) of `candidates` and, for a simulated
    reduced precision, per kernel model, all against one FP32 reference run per image.
    `model`: a checked ModelDir. `images`: a folder (default: synthetic images). `checkpoint`:
    the model folder's checkpoint, for the torch backend. `runner_options`: more arguments for
    the candidates' runners (create_runner's). Images a candidate refuses (outside a TensorRT
    engine's profile) are left out for all."""
    variants = model.manifest["variants"]
    reports = [ValidationReport(backend=backend, precision=precision, kernel_model=kernel,
                                flops_by_precision=variants.get(precision, {}).get("flops_by_precision", []))
               for backend, precision in candidates for kernel in _kernel_models(backend, precision)]
    # A TensorRT engine is measured here whether or not it was validated before: that is the point.
    options = {"accept_unvalidated": True, **(runner_options or {})}
    with ExitStack() as stack:
        reference = stack.enter_context(create_runner("onnxruntime", model=model, precision="fp32"))
        runners = [stack.enter_context(create_runner(report.backend, model=model, precision=report.precision,
                                                     checkpoint=checkpoint, **options,
                                                     **({"kernel_model": report.kernel_model}
                                                        if report.kernel_model else {})))
                   for report in reports]
        for name, rgb in _images(images):
            if any(runner.refusal(*rgb.shape[:2]) for runner in runners):
                continue
            prepared = prepare_input(rgb)
            truth = postprocess(reference.infer(prepared), reference.detection_head)
            for report, runner in zip(reports, runners):
                report.images.append(compare(name, postprocess(runner.infer(prepared), runner.detection_head), truth))
                if on_image is not None:
                    on_image(report.images[-1])
    return reports


def plot_deviation(reports: list, path, budgets: dict) -> None:
    """PNG: each image's map deviation against its size, one series per precision, with each
    precision's budget for the map as a dashed line (`budgets`: precision -> max abs)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    drawn = set()
    for report in reports:
        pixels = [_pixels(image.size) / 1e6 for image in report.images]
        errors = [max(image.map_max, 1e-9) for image in report.images]
        points = axes.scatter(pixels, errors, s=14, alpha=0.7, label=f"{report.label} ({report.backend})")
        if report.precision in budgets and report.precision not in drawn:
            drawn.add(report.precision)
            axes.axhline(budgets[report.precision], linestyle="--", color=points.get_facecolor()[0],
                         label=f"{report.precision} budget")
    axes.set(xscale="log", yscale="log", xlabel="image size (megapixels)",
             ylabel="map: max abs deviation from FP32", title="Deviation against image size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot.close(figure)
    write_atomically(path, buffer.getvalue())


def reports_json(reports: list) -> dict:
    """The --json document: one report as is; several under "variants", keyed by precision,
    a precision measured under several kernel models as {"kernel_models": {model: report}}."""
    if len(reports) == 1:
        return reports[0].to_json()
    variants = {}
    for report in reports:
        if report.kernel_model:
            variants.setdefault(report.precision, {"kernel_models": {}})["kernel_models"][report.kernel_model] = \
                report.to_json()
        else:
            variants[report.precision] = report.to_json()
    return {"variants": variants}


def validation_table(report):
    from rich.table import Table

    table = Table(title=f"{report.backend} {report.label} vs fp32 (onnxruntime)")
    for column in ("image", "map max", "map mean", "conf max", "conf mean", "score err", "np++ max", "flipped"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for row in report.images:
        table.add_row(row.image, f"{row.map_max:.2e}", f"{row.map_mean:.2e}", f"{row.conf_max:.2e}",
                      f"{row.conf_mean:.2e}", f"{row.score_error:.2e}", f"{row.noiseprint_max:.2e}",
                      "YES" if row.flipped else "no")
    overall = report.overall()
    table.add_row("overall", f"{overall['map_max']:.2e}", f"{overall['map_mean']:.2e}",
                  f"{overall['conf_max']:.2e}", f"{overall['conf_mean']:.2e}",
                  f"{overall['score_error_max']:.2e}", f"{overall['noiseprint_max']:.2e}",
                  str(overall["decisions_flipped"]))
    return table


def print_validation(report, out) -> None:
    """The report as `trufor-trt validate` prints it, on the rich console `out`."""
    out.print(validation_table(report))
    for size, worst in report.by_size().items():
        out.print(f"{report.label} at {size} ({worst['images']} images): map {worst['map_max']:.2e}, "
                  f"conf {worst['conf_max']:.2e}, score {worst['score_error_max']:.2e}, "
                  f"np++ {worst['noiseprint_max']:.2e}, flipped {worst['decisions_flipped']}")
    for record in report.flops_by_precision:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in record["network_share"].items() if share)
        out.print(f"{report.precision} FLOPs at {record['size']}: {shares}")


def validate_engine(model, engine: Path, images, on_step) -> Sidecar:
    """A reduced-precision engine (`build`'s) run against the FP32 graph (ONNX Runtime) on
    `images` (a folder; default: the synthetic images) on the GPU it was built for, and
    recorded in its sidecar (record_validation); returns the sidecar."""
    sidecar = Sidecar.read(sidecar_path(engine))
    what = f"the images in {images}" if images else "synthetic images"
    on_step(f"validating the {sidecar.precision} engine against the FP32 graph (ONNX Runtime) on {what}")
    [report] = validate(model, [("tensorrt", sidecar.precision)], images,
                        runner_options={"engine": engine, "accept_unvalidated": True})
    return record_validation(engine, sidecar, report, str(images or "synthetic"), on_step)


def record_validation(engine: Path, sidecar: Sidecar, report, images: str, on_step) -> Sidecar:
    """The engine's sidecar rewritten with the validation record of `report` (a
    validate.ValidationReport of this engine). One over budget is kept, and marked: runners
    refuse it unless told --accept-unvalidated. Without any image measured it stays unvalidated."""
    if not report.images:
        on_step("warning: no image fits the engine's profile: the engine stays unvalidated")
        return sidecar
    record = validation_record(report.overall(), BUDGETS[sidecar.precision], images)
    validated = replace(sidecar, validation=record)
    validated.write(sidecar_path(engine))
    if record["within_budget"]:
        on_step(f"validated on {record['image_count']} images: within the {sidecar.precision} budget")
    else:
        on_step(f"warning: over the {sidecar.precision} budget on {record['image_count']} images "
                f"({record['summary']}): kept, but runners refuse it unless --accept-unvalidated")
    return validated
