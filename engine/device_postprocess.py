"""The CPU postprocessor's work done in PyTorch, on the device the network ran on: upsampling
(in float64), sigmoids and the detector's pooling, in float32 with float64 sums, each exponential taken of a
difference to its maximum (the same formulas as engine/postprocess.py, which stays the
reference). The GPU runner then copies full-size maps and 8 features back instead of logits,
and the host's cores are spared the heaviest CPU stage."""

import math

import torch

from trufor_trt.engine.runner import FinishedOutputs


def _sum(values):
    return values.sum(dtype=torch.float64)


def _exp_sum(values, shift):
    return _sum((values - shift).exp())


def _uniform_statistics(values) -> list:
    low, high, log_count = values.min(), values.max(), math.log(values.numel())
    return [low - _exp_sum(-values, -low).log() + log_count, high + _exp_sum(values, high).log() - log_count,
            _sum(values) / values.numel(), _sum(values.square()) / values.numel()]


def _weighted_statistics(values, log_weights) -> list:
    top = log_weights.max()
    weights = (log_weights - top).exp()
    log_total = top + _sum(weights).log()
    above, below = log_weights + values, log_weights - values
    above_max, below_max = above.max(), below.max()
    return [-(below_max + _exp_sum(below, below_max).log() - log_total),
            above_max + _exp_sum(above, above_max).log() - log_total,
            _sum(weights * values) / _sum(weights), _sum(weights * values.square()) / _sum(weights)]


def finish_one(localization_logits, confidence_logits, noiseprint) -> tuple:
    """One image's 2 x h x w and 1 x h x w logits and its noiseprint (device tensors) -> the
    device tensors of its FinishedOutputs, in that class's field order (to_host copies them)."""
    height, width = noiseprint.shape[-2:]
    # In float64: PyTorch computes float32 inputs' source positions in float32, 5e-5 off at
    # sizes that are not 4x the grid (OpenCV's, on the CPU, are 2e-6 off the float64 result).
    logits = torch.cat([localization_logits, confidence_logits]).double()[None]
    upsampled = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                align_corners=False)[0].float()
    evidence, confidence = upsampled[1] - upsampled[0], upsampled[2]
    flat_confidence = confidence.reshape(-1)
    features = torch.stack([*_uniform_statistics(flat_confidence),
                            *_weighted_statistics(evidence.reshape(-1),
                                                  torch.nn.functional.logsigmoid(flat_confidence))])
    return torch.sigmoid(evidence), torch.sigmoid(confidence), features.double(), noiseprint.reshape(height, width)


def finish_batch(localization_logits, confidence_logits, noiseprint) -> list:
    """N images' network outputs (device tensors) -> each one's finish_one, image by image (the
    device memory of one image's full-size planes at a time, not N)."""
    return [finish_one(localization_logits[index], confidence_logits[index], noiseprint[index])
            for index in range(localization_logits.shape[0])]


def to_host(finished: list) -> list:
    """finish_batch's device tensors -> FinishedOutputs of numpy arrays."""
    return [FinishedOutputs(*(tensor.cpu().numpy() for tensor in tensors)) for tensors in finished]
