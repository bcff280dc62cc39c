"""The TruFor network, split where the engines split it.

`TruFor.forward` is the part every engine runs: it returns the 1/4-resolution localization and
confidence logits and the full-resolution Noiseprint++ map. Upsampling, softmax / sigmoid and
the detection head run afterwards in the CPU postprocessor (`trufor_trt.engine.postprocess`).
The detection head's weights still live here so that the official checkpoint loads strictly.
"""

import copy

import torch
from torch import nn

from trufor_trt.architecture import CONFIDENCE_CLASSES, LOCALIZATION_CLASSES
from trufor_trt.model.decoder import CONFIDENCE_BN_EPS, LOCALIZATION_BN_EPS, DecoderHead, decode_in_bands
from trufor_trt.model.encoder import DualMiT
from trufor_trt.model.formulation import BOUNDED, Formulation
from trufor_trt.model.noiseprint import build_noiseprint, noiseprint_in_row_bands

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTION_FEATURES = 8
DETECTION_HIDDEN = 128


def _channel_constant(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1)


class TruFor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = DualMiT()
        self.decode_head = DecoderHead(classes=LOCALIZATION_CLASSES, bn_eps=LOCALIZATION_BN_EPS)
        self.decode_head_conf = DecoderHead(classes=CONFIDENCE_CLASSES, bn_eps=CONFIDENCE_BN_EPS)
        self.detection = nn.Sequential(
            nn.Linear(DETECTION_FEATURES, DETECTION_HIDDEN),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(DETECTION_HIDDEN, 1),
        )
        self.dncnn = build_noiseprint()
        # Not in the checkpoint (non-persistent), but follows .to(dtype/device).
        self.register_buffer("rgb_mean", _channel_constant(IMAGENET_MEAN), persistent=False)
        self.register_buffer("rgb_std", _channel_constant(IMAGENET_STD), persistent=False)
        self.form = BOUNDED

    def noiseprint(self, image: torch.Tensor, form: Formulation) -> torch.Tensor:
        """Noiseprint++, in row bands when the formulation sets a band height."""
        rows = form.noiseprint_band_rows
        if rows is None or rows >= image.shape[-2]:
            return self.dncnn(image)
        return noiseprint_in_row_bands(self.dncnn, image, rows)

    def forward(self, image: torch.Tensor, form: Formulation | None = None):
        """image: N x 3 x H x W, RGB / 256. Returns (N x 2 x H/4 x W/4 localization logits,
        N x 1 x H/4 x W/4 confidence logits, N x 1 x H x W Noiseprint++), computed in `form`
        (default: the network's `form`, BOUNDED unless traced_as set another)."""
        form = form or self.form
        noiseprint = self.noiseprint(image, form)
        return (*self.logits(image, noiseprint, form), noiseprint)

    def traced_as(self, form: Formulation) -> "TruFor":
        """The same network (its modules and weights shared) whose forward computes in `form`
        by default: what an exporter that calls forward(image) traces."""
        view = copy.copy(self)
        view.form = form
        return view

    def logits(self, image: torch.Tensor, noiseprint: torch.Tensor, form: Formulation):
        """Everything after Noiseprint++: the two-stream encoder and both decoders."""
        features = self.features(image, noiseprint, form)
        heads = (self.decode_head, self.decode_head_conf)
        rows = form.decoder_band_rows
        if rows is None or rows >= features[0].shape[-2]:
            return tuple(head(features, form) for head in heads)
        return tuple(decode_in_bands(heads, features, rows))

    def features(self, image: torch.Tensor, noiseprint: torch.Tensor, form: Formulation) -> list:
        """The two-stream encoder's fused maps at 1/4, 1/8, 1/16 and 1/32."""
        return self.backbone((image - self.rgb_mean) / self.rgb_std, noiseprint.expand(-1, 3, -1, -1), form)
