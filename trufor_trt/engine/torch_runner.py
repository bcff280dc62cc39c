"""The PyTorch reference backend: our checkpoint-compatible network, eager, batch of one."""

from contextlib import nullcontext

import numpy as np

from .postprocess import DetectionHead
from .runner import RawOutputs, Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, checkpoint, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 official: bool = False):
        """`official`: compute attention as the official code does (explicit score matrices)
        instead of the bounded-memory kernel; the benchmarks' reference."""
        super().__init__()
        self.checkpoint = checkpoint
        self.requested_device = device
        self.precision = precision
        self.threads = threads
        self.official = official
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
        if self.threads:
            torch.set_num_threads(self.threads)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}[self.precision]
        network = load_trufor(self.checkpoint)
        self.detection_head = DetectionHead(**detection_head_arrays(network))
        self.network = network.to(device=self.device, dtype=dtype)
        self.dtype = dtype

    def _formulation(self):
        from ..model.attention import attention_form

        # The "tensorrt" form is the official computation: MatMul -> Softmax -> MatMul.
        return attention_form("tensorrt") if self.official else nullcontext()

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        import torch

        with torch.inference_mode(), self._formulation():
            if self.device == "cpu":
                outputs = self.network(torch.from_numpy(prepared).to(dtype=self.dtype))
                return RawOutputs.from_batch_of_one(*(out.numpy() for out in outputs))
            return self._infer_timed_on_gpu(torch, prepared)

    def _infer_timed_on_gpu(self, torch, prepared: np.ndarray) -> RawOutputs:
        start, copied_in, computed, copied_out = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        start.record()
        image = torch.from_numpy(prepared).to(device=self.device, dtype=self.dtype)
        copied_in.record()
        outputs = self.network(image)
        computed.record()
        results = [out.cpu().numpy() for out in outputs]
        copied_out.record()
        torch.cuda.synchronize(self.device)
        self.last_stage_ms = {"host_to_device": start.elapsed_time(copied_in),
                              "inference": copied_in.elapsed_time(computed),
                              "device_to_host": computed.elapsed_time(copied_out)}
        return RawOutputs.from_batch_of_one(*results)

    def device_memory_bytes(self):
        if self.device is None or self.device == "cpu":
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device)

    def close(self) -> None:
        self.network = None
