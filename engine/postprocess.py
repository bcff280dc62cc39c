"""The CPU postprocessor: from the engines' raw outputs to the official TruFor outputs.

numpy only (no torch), so every backend, on every machine, finishes the same way:
- logits upsampled from the 1/4 grid to H x W exactly as F.interpolate(bilinear,
  align_corners=False) does;
- `map` = softmax over the two localization logits, class 1; `conf` = sigmoid;
- `score` = sigmoid(detection MLP(weighted statistics pooling of conf and of the logit
  difference, weighted by log-sigmoid(conf))), computed in float64.
"""

from dataclasses import dataclass

import numpy as np

from trufor_trt.bands import bilinear_taps
from trufor_trt.engine.runner import RawOutputs


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
    """C x h x w -> C x H x W (float64), equal to F.interpolate(bilinear, align_corners=False)."""
    planes = planes.astype(np.float64, copy=False)
    top, bottom, down = bilinear_taps(planes.shape[1], height)
    rows = planes[:, top, :] * (1.0 - down)[:, None] + planes[:, bottom, :] * down[:, None]
    left, right, across = bilinear_taps(planes.shape[2], width)
    return rows[:, :, left] * (1.0 - across) + rows[:, :, right] * across


def _logsumexp(values: np.ndarray) -> float:
    peak = values.max()
    return float(peak + np.log(np.exp(values - peak).sum()))


def _log_softmax(values: np.ndarray) -> np.ndarray:
    return values - _logsumexp(values)


def _products_summed(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in float64, in the same order whatever the machine's thread settings."""
    return np.sum(matrix.astype(np.float64) * vector, axis=1)


def _log_sigmoid(values: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -values)


def _sigmoid(values):
    return np.exp(_log_sigmoid(values))


def weighted_statistics(values: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """[soft min, soft max, mean, mean square] of values under softmax(log_weights)."""
    values = values.ravel().astype(np.float64, copy=False)
    log_w = _log_softmax(log_weights.ravel().astype(np.float64, copy=False))
    weights = np.exp(log_w)
    return np.array([
        -_logsumexp(log_w - values),
        _logsumexp(log_w + values),
        float(np.sum(weights * values)),
        float(np.sum(weights * values * values)),
    ])


def detection_features(localization_logits: np.ndarray, confidence_logits: np.ndarray) -> np.ndarray:
    """The 8 pooled features of the official 'confpool' detector, from full-size logits."""
    confidence = confidence_logits.reshape(-1)
    evidence = localization_logits[1] - localization_logits[0]
    return np.concatenate([
        weighted_statistics(confidence, np.zeros_like(confidence)),
        weighted_statistics(evidence, _log_sigmoid(confidence)),
    ])


def analysis_from_full_logits(localization_logits: np.ndarray, confidence_logits: np.ndarray,
                              noiseprint: np.ndarray, head: DetectionHead) -> Analysis:
    """From 2 x H x W and H x W logits (the official network's own outputs) to its results."""
    logit = head.logit(detection_features(localization_logits, confidence_logits))
    return Analysis(
        localization_map=_sigmoid(localization_logits[1] - localization_logits[0]).astype(np.float32),
        confidence_map=_sigmoid(confidence_logits).astype(np.float32),
        score=float(_sigmoid(logit)),
        detection_logit=logit,
        noiseprint=np.asarray(noiseprint, dtype=np.float32),
    )


def postprocess(raw: RawOutputs, head: DetectionHead) -> Analysis:
    """The engines' 1/4-resolution logits -> the official outputs at the input size."""
    height, width = raw.noiseprint.shape
    localization = upsample_bilinear(raw.localization_logits, height, width)
    confidence = upsample_bilinear(raw.confidence_logits, height, width)[0]
    return analysis_from_full_logits(localization, confidence, raw.noiseprint, head)
