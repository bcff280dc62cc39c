"""The one runner interface every backend (PyTorch, ONNX Runtime, TensorRT) sits behind.

A runner is loaded once, then takes one prepared input (1 x 3 x H x W float32, see
`preprocess.prepare_input`) at a time and returns the network's raw outputs; the CPU
postprocessor turns those into the official results the same way for every backend. Runners on
a GPU may also take a batch of same-size images at once (`batch_limit`, `infer_batch`).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

# The exported graph's tensor names: every backend and every graph variant uses these.
INPUT_NAME = "image"
OUTPUT_NAMES = ("localization_logits", "confidence_logits", "noiseprint")


@dataclass(frozen=True)
class RawOutputs:
    """The exported part of the network's outputs for one image."""

    localization_logits: np.ndarray  # 2 x H/4 x W/4
    confidence_logits: np.ndarray  # 1 x H/4 x W/4
    noiseprint: np.ndarray  # H x W

    @classmethod
    def from_batch_of_one(cls, localization, confidence, noiseprint) -> "RawOutputs":
        return cls.from_batch(localization, confidence, noiseprint)[0]

    @classmethod
    def from_batch(cls, localization, confidence, noiseprint) -> list:
        """The network's N-image outputs -> one RawOutputs per image."""
        localization, confidence, noiseprint = map(np.asarray, (localization, confidence, noiseprint))
        return [cls(localization_logits=localization[index], confidence_logits=confidence[index],
                    noiseprint=noiseprint[index, 0]) for index in range(localization.shape[0])]


@dataclass(frozen=True)
class FinishedOutputs:
    """One image's outputs at its own size, postprocessed where the network ran (a GPU runner's
    choice: upsampling and pooling there cost less than the copies and the CPU's time); the
    detection MLP, 8 -> 1, is left to the CPU postprocessor, which finishes every runner's score."""

    localization_map: np.ndarray  # H x W float32
    confidence_map: np.ndarray  # H x W float32
    detection_features: np.ndarray  # the 8 pooled features, float64
    noiseprint: np.ndarray  # H x W


class Runner(ABC):
    """load() -> infer() per image -> close(); also a context manager.

    After load(), `detection_head` holds the detection MLP of the model this runner runs,
    `model_sha256` the SHA-256 of the checkpoint it came from and `model_files_sha256` one
    SHA-256 over the files it loaded (model_dir.files_sha256): the outputs' provenance.
    Runners on a GPU also time their device stages: after infer(), `last_stage_ms` holds
    host_to_device, inference (and device_postprocess, where they postprocess there) and
    device_to_host in milliseconds (CUDA events); CPU runners
    leave it empty, their inference being the infer() call itself. Runners that run the
    network as separate graphs (ONNX Runtime FP32) record each part's milliseconds in
    `last_parts_ms` (noiseprint, encoder, decoders), so that `bench` shows where time goes.
    """

    backend: str = ""
    precision: str = ""
    # Runners side by side by default: 1, or more where they overlap on one device.
    default_streams: int = 1

    def __init__(self):
        self.detection_head = None
        self.model_sha256 = None
        self.model_files_sha256 = None
        self.last_stage_ms = {}
        self.last_parts_ms = {}

    @abstractmethod
    def load(self) -> None:
        """Acquire everything heavy (weights, sessions, engines, device memory)."""

    @abstractmethod
    def infer(self, prepared: np.ndarray) -> RawOutputs:
        """One prepared input -> its raw outputs (or FinishedOutputs, from runners that
        postprocess on their device)."""

    def batch_limit(self, height: int, width: int) -> int:
        """How many images of this size infer_batch() computes together (1: one at a time)."""
        return 1

    def takes_batches(self) -> bool:
        """Whether batch_limit is above 1 for some image size (what `analyze --batch` needs)."""
        return False

    def infer_batch(self, prepared: np.ndarray) -> list:
        """N prepared images of one size (N x 3 x H x W, N <= batch_limit) -> their raw outputs,
        in order. Same-size images only: nothing is ever padded or resized into a batch."""
        return [self.infer(prepared[index:index + 1]) for index in range(prepared.shape[0])]

    def refusal(self, height: int, width: int):
        """Why this runner cannot take an image of this size (checked from the file's header,
        before any decoding), or None."""
        return None

    def close(self) -> None:
        """Release what load() acquired."""

    def on_gpu(self) -> bool:
        """Whether this runner computes on a GPU (then it needs no share of the host's cores)."""
        return False

    def device_memory_bytes(self):
        """Peak device memory this runner has used, where it runs on a device; else None."""
        return None

    def __enter__(self) -> "Runner":
        self.load()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
