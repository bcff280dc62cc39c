"""The CPU postprocessor: from the engines' raw outputs to the official TruFor outputs.

numpy only (no torch), so every backend, on every machine, finishes the same way:
- logits upsampled from the 1/4 grid to H x W as F.interpolate(bilinear, align_corners=False)
  does;
- `map` = softmax over the two localization logits, class 1; `conf` = sigmoid;
- `score` = sigmoid(detection MLP(weighted statistics pooling of conf and of the logit
  difference, weighted by log-sigmoid(conf))).
In float32 like the official network, sums and the MLP in float64, every exponential taken of a
difference to its maximum: within float32 rounding of the official float64 tail, at the speed
of memory (tests/test_postprocess.py holds both).
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np

from trufor_trt.engine.runner import FinishedOutputs, RawOutputs


@dataclass(frozen=True)
class DetectionHead:
    """The detection MLP (Linear 8->128, ReLU, Linear 128->1) as numpy arrays."""

    hidden_weight: np.ndarray
    hidden_bias: np.ndarray
    output_weight: np.ndarray
    output_bias: np.ndarray

    def logit(self, features: np.ndarray) -> float:
        # Products summed by numpy, not BLAS: BLAS sums in an order that depends on its thread
        # count (OMP_NUM_THREADS, which Ray sets per worker), and the score's last bits with it.
        hidden = np.maximum(_products_summed(self.hidden_weight, features) + self.hidden_bias, 0.0)
        return float((_products_summed(self.output_weight, hidden) + self.output_bias)[0])


DECISION_THRESHOLD = 0.5  # a score at or above it reads "forged"


def decision_flipped(ours: float, truth: float) -> bool:
    """Whether `ours` decides otherwise than `truth`; a non-finite score is no decision at all."""
    return not np.isfinite(ours) or (ours >= DECISION_THRESHOLD) != (truth >= DECISION_THRESHOLD)


@dataclass(frozen=True)
class Analysis:
    """The official outputs for one image."""

    localization_map: np.ndarray  # H x W float32, `map`
    confidence_map: np.ndarray  # H x W float32, `conf`
    score: float  # integrity score in [0, 1]; forged above 0.5
    detection_logit: float
    noiseprint: np.ndarray  # H x W float32, `np++`


def upsample_bilinear(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """C x h x w -> C x H x W float32: F.interpolate(bilinear, align_corners=False).

    OpenCV's linear resize follows the same half-pixel rule and clamps at the edges the same
    way; its float32 weights put it within float32 rounding (1e-7 relative) of the float64
    interpolation, at a few milliseconds per megapixel instead of gathers over every pixel.
    Each output pixel is computed on its own, so the bits do not depend on OpenCV's threads."""
    planes = np.asarray(planes, dtype=np.float32)
    upsampled = np.empty((planes.shape[0], height, width), np.float32)
    for index, plane in enumerate(planes):
        cv2.resize(plane, (width, height), dst=upsampled[index], interpolation=cv2.INTER_LINEAR)
    return upsampled


def _products_summed(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in float64, in the same order whatever the machine's thread settings."""
    return np.sum(matrix.astype(np.float64) * vector, axis=1)


def _sum(values: np.ndarray) -> float:
    """A float64 sum of float32 values; numpy's pairwise order, the same on every thread setting
    (BLAS dot products are not)."""
    return float(np.sum(values, dtype=np.float64))


def _exp_sum(values: np.ndarray, shift: float) -> float:
    """sum(exp(values - shift)), the exponentials in float32 (shift = the maximum: each <= 1)."""
    terms = values - np.float32(shift)
    np.exp(terms, out=terms)
    return _sum(terms)


def _log_sigmoid(values: np.ndarray) -> np.ndarray:
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), finite for every finite x."""
    tail = np.abs(values)
    np.negative(tail, out=tail)
    np.exp(tail, out=tail)
    np.log1p(tail, out=tail)
    return np.minimum(values, np.float32(0.0)) - tail


def _sigmoid(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x < -88 gives 1/inf = 0, the limit
        result = np.negative(values)
        np.exp(result, out=result)
        result += np.float32(1.0)
        return np.reciprocal(result, out=result)


def _uniform_statistics(values: np.ndarray) -> list:
    """[soft min, soft max, mean, mean square] of values under equal weights."""
    low, high, log_count = float(values.min()), float(values.max()), math.log(values.size)
    return [low - math.log(_exp_sum(-values, -low)) + log_count,
            high + math.log(_exp_sum(values, high)) - log_count,
            _sum(values) / values.size,
            _sum(np.square(values)) / values.size]


def _weighted_statistics(values: np.ndarray, log_weights: np.ndarray) -> list:
    """[soft min, soft max, mean, mean square] of values under softmax(log_weights).

    Every exponential is taken of a difference to its maximum (each term <= 1, the largest 1),
    so float32 terms lose nothing that float64 sums of the official float64 terms would keep."""
    top = float(log_weights.max())
    weights = log_weights - np.float32(top)
    np.exp(weights, out=weights)
    log_total = top + math.log(_sum(weights))  # logsumexp(log_weights)
    above, below = log_weights + values, log_weights - values
    above_max, below_max = float(above.max()), float(below.max())
    return [-(below_max + math.log(_exp_sum(below, below_max)) - log_total),
            above_max + math.log(_exp_sum(above, above_max)) - log_total,
            _sum(weights * values) / _sum(weights),
            _sum(weights * np.square(values)) / _sum(weights)]


def detection_features(evidence: np.ndarray, confidence_logits: np.ndarray) -> np.ndarray:
    """The 8 pooled features of the official 'confpool' detector: statistics of the confidence
    logits (equal weights) and of the evidence (logit difference) weighted by sigmoid(conf)."""
    confidence = confidence_logits.ravel()
    return np.array(_uniform_statistics(confidence)
                    + _weighted_statistics(evidence.ravel(), _log_sigmoid(confidence)))


def _score(logit: float) -> float:
    """sigmoid, in float64 and finite at both ends."""
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))


def analysis_from_full_logits(localization_logits: np.ndarray, confidence_logits: np.ndarray,
                              noiseprint: np.ndarray, head: DetectionHead) -> Analysis:
    """From 2 x H x W and H x W logits (the official network's own outputs) to its results, in
    float32 like the official network (the pooled sums in float64)."""
    localization_logits = np.asarray(localization_logits, dtype=np.float32)
    confidence_logits = np.asarray(confidence_logits, dtype=np.float32)
    evidence = localization_logits[1] - localization_logits[0]  # softmax's class 1 = its sigmoid
    logit = head.logit(detection_features(evidence, confidence_logits))
    return Analysis(
        localization_map=_sigmoid(evidence),
        confidence_map=_sigmoid(confidence_logits),
        score=_score(logit),
        detection_logit=logit,
        noiseprint=np.asarray(noiseprint, dtype=np.float32),
    )


def postprocess(raw: RawOutputs | FinishedOutputs, head: DetectionHead) -> Analysis:
    """The engines' 1/4-resolution logits (RawOutputs) -> the official outputs at the input size;
    outputs finished on a device (FinishedOutputs) get their score here."""
    if isinstance(raw, FinishedOutputs):
        logit = head.logit(raw.detection_features)
        return Analysis(localization_map=raw.localization_map, confidence_map=raw.confidence_map,
                        score=_score(logit), detection_logit=logit,
                        noiseprint=np.asarray(raw.noiseprint, dtype=np.float32))
    height, width = raw.noiseprint.shape
    localization = upsample_bilinear(raw.localization_logits, height, width)
    confidence = upsample_bilinear(raw.confidence_logits, height, width)[0]
    return analysis_from_full_logits(localization, confidence, raw.noiseprint, head)
