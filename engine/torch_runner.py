"""The PyTorch reference backend: our checkpoint-compatible network, eager; on a GPU it also
takes batches of same-size images."""

from pathlib import Path

import numpy as np

from trufor_trt.errors import RunnerFailure, one_line
from trufor_trt.files import sha256_file
from trufor_trt.held_setting import HeldSetting
from trufor_trt.engine.memory_budget import MemoryModel, physical_memory
from trufor_trt.engine.model_dir import files_sha256
from trufor_trt.engine.postprocess import DetectionHead
from trufor_trt.engine.runner import RawOutputs, Runner

# Peak RSS of `analyze` per image on the CPU (measured with PyTorch 2.13 on the 2-core CPU; docs/large-images.md).
CPU_MEMORY = MemoryModel(fixed_bytes=0.8e9, bytes_per_pixel=400, noiseprint_bytes_per_pixel=800,
                         decoder_bytes_per_cell=16000)
# Same-size images one forward pass takes on a GPU (analyze --batch asks for up to this many).
GPU_BATCH_LIMIT = 64

def _tf32_off():
    """TF32 off for CUDA matrix products and cuDNN convolutions; returns the user's setting."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return saved


def _tf32_restored(saved) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# TF32 off while any runner computes, the user's setting restored when the last one is done (the
# switches are process-wide, and runners may run side by side on threads). PyTorch leaves
# cuDNN's TF32 on by default, which rounds FP32 inputs to 10-bit mantissas on Ampere and newer.
exact_fp32_on_cuda = HeldSetting(_tf32_off, _tf32_restored).held


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, checkpoint, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 official: bool = False, max_memory_bytes=None, postprocess_on_device: bool = True,
                 gpu_memory_budget=None):
        """`official`: compute as the official code does (explicit attention score matrices,
        the decoders' 2048-channel concatenation), not in bounded memory; the benchmarks'
        reference. `max_memory_bytes`: the host budget the row bands are sized from on the CPU
        (default: the machine's physical memory). `postprocess_on_device`: on a GPU, return
        FinishedOutputs postprocessed there (engine/device_postprocess.py), else raw logits.
        `gpu_memory_budget`: on a GPU, run TensorRT's chain (Noiseprint++ and the decoders in
        the bands engine/chain_plan.py sizes for this many bytes, the encoder whole) instead of
        the whole image at once (default)."""
        super().__init__()
        self.gpu_memory_budget = gpu_memory_budget
        self.max_memory_bytes = max_memory_bytes or physical_memory()
        self.checkpoint = checkpoint
        self.requested_device = device
        self.precision = precision
        self.threads = threads
        self.official = official
        self.postprocess_on_device = postprocess_on_device
        self.network = None
        self.device = None
        self.dtype = None

    def load(self) -> None:
        import torch

        from trufor_trt.model import detection_head_arrays, load_trufor

        if self.requested_device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = self.requested_device
        if self.threads:
            torch.set_num_threads(self.threads)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}[self.precision]
        network = load_trufor(self.checkpoint)
        self.detection_head = DetectionHead(**detection_head_arrays(network))
        self.model_sha256 = sha256_file(self.checkpoint)
        self.model_files_sha256 = files_sha256({Path(self.checkpoint).name: self.model_sha256})
        self.network = network.to(device=self.device, dtype=dtype)
        self.dtype = dtype

    def _bounded_on_cpu(self) -> bool:
        return self.device == "cpu" and not self.official

    def _formulation(self, height: int, width: int):
        """The network's formulation for an image of this size (a value per call: runners on
        several threads may share nothing but the weights)."""
        from trufor_trt.model import formulation

        if self.official:
            return formulation.OFFICIAL
        memory, budget = self._band_budget()
        if memory is None:
            return formulation.BOUNDED
        plan = memory.plan(height, width, budget)
        return formulation.in_bands(plan.noiseprint_rows, plan.decoder_rows)

    def _band_budget(self):
        """(memory model, budget) the bands are sized by, or (None, None) for the whole image."""
        if self._bounded_on_cpu():
            return CPU_MEMORY, self.max_memory_bytes
        if self.on_gpu() and self.gpu_memory_budget and not self.official:
            from trufor_trt.engine.chain_plan import device_memory_model

            weights = sum(parameter.numel() * parameter.element_size() for parameter in self.network.parameters())
            return device_memory_model("fp32", weights), self.gpu_memory_budget
        return None, None

    def refusal(self, height: int, width: int):
        memory, budget = self._band_budget()
        return memory.refusal(height, width, budget) if memory is not None else None

    def on_gpu(self) -> bool:
        return self.device not in (None, "cpu")

    def takes_batches(self) -> bool:
        return self.on_gpu()

    def batch_limit(self, height: int, width: int) -> int:
        return GPU_BATCH_LIMIT if self.takes_batches() else 1

    def infer(self, prepared: np.ndarray) -> RawOutputs:
        import torch

        if self.device != "cpu":
            return self.infer_batch(prepared)[0]
        with torch.inference_mode():
            outputs = self.network(torch.from_numpy(prepared).to(dtype=self.dtype),
                                   self._formulation(*prepared.shape[2:]))
        return RawOutputs.from_batch_of_one(*(out.numpy() for out in outputs))

    def infer_batch(self, prepared: np.ndarray) -> list:
        if self.device == "cpu":  # row bands are planned per image: one at a time
            return super().infer_batch(prepared)
        import torch

        try:
            with torch.inference_mode():
                return self._infer_timed_on_gpu(torch, prepared, self._formulation(*prepared.shape[2:]))
        except torch.cuda.OutOfMemoryError:
            raise  # these images are too large for the GPU; smaller ones may still run
        except RuntimeError as exc:  # a CUDA error leaves the context unusable
            raise RunnerFailure(f"PyTorch on {self.device} failed: {one_line(exc)}") from exc

    def _infer_timed_on_gpu(self, torch, prepared: np.ndarray, form) -> list:
        start, copied_in, computed, postprocessed, copied_out = (torch.cuda.Event(enable_timing=True)
                                                                 for _ in range(5))
        start.record()
        image = torch.from_numpy(prepared).to(device=self.device, dtype=self.dtype)
        copied_in.record()
        with exact_fp32_on_cuda():
            outputs = self.network(image, form)
        computed.record()
        if self.postprocess_on_device:
            from trufor_trt.engine.device_postprocess import finish_batch, to_host

            finished = finish_batch(*outputs)
            postprocessed.record()
            results = to_host(finished)
        else:
            postprocessed.record()
            results = RawOutputs.from_batch(*(out.cpu().numpy() for out in outputs))
        copied_out.record()
        torch.cuda.synchronize(self.device)
        self.last_stage_ms = {"host_to_device": start.elapsed_time(copied_in),
                              "inference": copied_in.elapsed_time(computed),
                              "device_to_host": postprocessed.elapsed_time(copied_out)}
        if self.postprocess_on_device:
            self.last_stage_ms["device_postprocess"] = computed.elapsed_time(postprocessed)
        return results

    def device_memory_bytes(self):
        if self.device is None or self.device == "cpu":
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device)

    def close(self) -> None:
        self.network = None
