"""`trufor-trt validate`: how far one engine or graph variant lands from the FP32 reference.

Per image: max and mean abs error of `map` and `conf`, the score error, and whether the
decision at 0.5 flipped; overall: the worst of each, the mean of the means, the flips.
The reference is the model folder's FP32 graph in ONNX Runtime.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from .batch.inputs import expand_inputs
from .engine import create_runner
from .engine.decode import decode_image
from .engine.postprocess import postprocess
from .engine.preprocess import prepare_input
from .export.synthetic import synthetic_image

DECISION_THRESHOLD = 0.5
SYNTHETIC_SIZES = ((256, 256), (173, 229), (384, 256))


@dataclass
class ImageReport:
    image: str
    map_max: float
    map_mean: float
    conf_max: float
    conf_mean: float
    score_error: float
    score: float
    reference_score: float
    flipped: bool


@dataclass
class ValidationReport:
    backend: str
    precision: str
    images: list = field(default_factory=list)

    def overall(self) -> dict:
        return {"images": len(self.images),
                "map_max": max(r.map_max for r in self.images),
                "map_mean": float(np.mean([r.map_mean for r in self.images])),
                "conf_max": max(r.conf_max for r in self.images),
                "conf_mean": float(np.mean([r.conf_mean for r in self.images])),
                "score_error_max": max(r.score_error for r in self.images),
                "decisions_flipped": sum(r.flipped for r in self.images)}

    def to_json(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "reference": "fp32, onnxruntime",
                "overall": self.overall(), "per_image": [asdict(report) for report in self.images]}


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
    finite = bool(np.isfinite(ours.score))
    # A non-finite score is no decision at all: it counts as flipped.
    flipped = not finite or (ours.score >= DECISION_THRESHOLD) != (reference.score >= DECISION_THRESHOLD)
    return ImageReport(image=name, map_max=float(map_error.max()), map_mean=float(map_error.mean()),
                       conf_max=float(conf_error.max()), conf_mean=float(conf_error.mean()),
                       score_error=abs(ours.score - reference.score) if finite else float("inf"),
                       score=ours.score, reference_score=reference.score, flipped=flipped)


def validate(model, backend: str, precision: str, images=None, on_image=None) -> ValidationReport:
    """`model`: a checked ModelDir. `images`: a folder (default: synthetic images)."""
    report = ValidationReport(backend=backend, precision=precision)
    reference = create_runner("onnxruntime", model=model, precision="fp32")
    candidate = create_runner(backend, model=model, precision=precision)
    with reference, candidate:
        for name, rgb in _images(images):
            prepared = prepare_input(rgb)
            truth = postprocess(reference.infer(prepared), reference.detection_head)
            ours = postprocess(candidate.infer(prepared), candidate.detection_head)
            report.images.append(compare(name, ours, truth))
            if on_image is not None:
                on_image(report.images[-1])
    return report
