"""Every exported graph proves itself against the PyTorch network computed in float64.

Bounds on the raw outputs (max abs, on synthetic images at two sizes, one odd):
- Noiseprint++: 4e-3, the faithfulness floor for np++; our float32 lands ~5e-4 from float64.
- logits: 1.5e-2. The official code in float32 lands up to ~6e-3 from float64 on some images'
  logits (the golden files' err_* keys) because this network amplifies rounding; a faithful
  float32 graph lands within about 2.5x of that, which is 1.5e-2. A wrong graph (a missing
  eps, a swapped head, a bad resize) is off by 1e-1 and more.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch

from trufor_trt.engine.model_dir import CPU_VARIANT, VARIANTS
from trufor_trt.engine.onnxruntime_runner import CpuSessions, create_session, run_session
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.engine.runner import OUTPUT_NAMES, RawOutputs
from trufor_trt.errors import TruforError
from trufor_trt.export.synthetic import synthetic_image

VERIFY_SIZES = ((61, 83), (96, 128))
# The CPU graphs are verified as the runner runs them, in several row bands of each kind (the
# decoders: groups of 13 rows of the 1/4 grid, in bands of 8 and 5).
VERIFY_NOISEPRINT_ROWS, VERIFY_DECODER_ROWS = 24, 13
BOUNDS = {"localization_logits": 1.5e-2, "confidence_logits": 1.5e-2, "noiseprint": 4e-3}


class ExportVerificationError(TruforError):
    """An exported graph does not reproduce the network."""


@dataclass(frozen=True)
class Deviation:
    graph: str
    size: tuple
    max_abs: dict  # output name -> max abs error against float64

    def over_bounds(self) -> dict:
        return {name: error for name, error in self.max_abs.items() if error > BOUNDS[name]}


def float64_reference(network):
    """A float64 copy of the network; `infer(prepared)` -> RawOutputs."""
    reference = copy.deepcopy(network).double().eval()

    def infer(prepared: np.ndarray) -> RawOutputs:
        with torch.inference_mode():
            outputs = reference(torch.from_numpy(prepared.astype(np.float64)))
        return RawOutputs.from_batch_of_one(*(out.numpy() for out in outputs))

    return infer


def raw_deviation(ours: RawOutputs, reference: RawOutputs) -> dict:
    return {name: float(np.max(np.abs(getattr(ours, name).astype(np.float64) - getattr(reference, name))))
            for name in OUTPUT_NAMES}


def _graph_runs(folder) -> dict:
    """name -> infer(prepared) for the exported graphs in `folder`, each as ONNX Runtime runs it
    (the TensorRT-shaped graph only where it was exported)."""
    files = {variant.name: folder / variant.file for variant in VARIANTS}
    cpu = CpuSessions.from_files(files)
    runs = {CPU_VARIANT: lambda prepared: cpu.run(prepared, VERIFY_NOISEPRINT_ROWS, VERIFY_DECODER_ROWS)}
    if files["fp32"].is_file():
        whole = create_session(files["fp32"])
        runs = {"fp32": lambda prepared: run_session(whole, prepared), **runs}
    return runs


def verify_graphs(network, folder) -> list:
    """Run the exported graphs in `folder` in ONNX Runtime on the verification images; raise
    ExportVerificationError naming the worst output if any is over its bound."""
    reference = float64_reference(network)
    inputs = [prepare_input(synthetic_image(h, w, seed=index)) for index, (h, w) in enumerate(VERIFY_SIZES)]
    expected = [reference(prepared) for prepared in inputs]
    deviations = []
    for name, infer in _graph_runs(folder).items():
        for prepared, truth in zip(inputs, expected):
            deviation = Deviation(name, prepared.shape[2:], raw_deviation(infer(prepared), truth))
            deviations.append(deviation)
            over = deviation.over_bounds()
            if over:
                output, error = max(over.items(), key=lambda item: item[1] / BOUNDS[item[0]])
                raise ExportVerificationError(
                    f"graph {name} at {prepared.shape[2]}x{prepared.shape[3]}: {output} is {error:.3g} "
                    f"from the float64 network (bound {BOUNDS[output]:g}): the export is not faithful")
    return deviations
