"""The PyTorch reference backend: our checkpoint-compatible network, eager, batch of one."""

import numpy as np

from .postprocess import DetectionHead
from .runner import RawOutputs, Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, checkpoint, device: str = "auto", precision: str = "fp32"):
        super().__init__()
        self.checkpoint = checkpoint
        self.requested_device = device
        self.precision = precision
        self.network = None
        self.device = None
        self.dtype = None

    def load(self) -> None:
        import torch

        from ..model import detection_head_arrays, load_trufor

        if self.requested_device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = self.requested_device
        dtype = {"fp32": torch.float32, "fp64": torch.float64}[self.precision]
        network = load_trufor(self.checkpoint)
        self.detection_head = DetectionHead(**detection_head_arrays(network))
        self.network = network.to(device=self.device, dtype=dtype)
        self.dtype = dtype

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        import torch

        with torch.inference_mode():
            image = torch.from_numpy(prepared).to(device=self.device, dtype=self.dtype)
            outputs = self.network(image)
            return RawOutputs.from_batch_of_one(*(out.cpu().numpy() for out in outputs))

    def close(self) -> None:
        self.network = None
