"""How far a graph variant moves the published outputs from the FP32 graph, on the CPU."""

import hashlib

import numpy as np
import onnx

from trufor_trt.bands import noiseprint_row_bands
from trufor_trt.engine.onnxruntime_runner import create_session
from trufor_trt.engine.postprocess import decision_flipped, postprocess
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs
from trufor_trt.export.chain_parts import cut_after_noiseprint
from trufor_trt.precision.row_chunks import attention_in_row_chunks, row_chunks_for

OUTPUTS = ("map", "conf", "score", "np++")
NOISEPRINT_RUNS_KEPT = 8  # distinct Noiseprint++ parts whose outputs are kept
# Noiseprint++'s simulated FP16 forms hold several 64- and 128-channel full-resolution tensors
# at once: 6 GB more at 1536x2048 whole, a band's share of it in row bands (exact: bands.py).
NOISEPRINT_BAND_PIXELS = 2 ** 20


def create_session_from_model(model: onnx.ModelProto):
    return create_session(model.SerializeToString())


def _in_row_bands(session, prepared: np.ndarray) -> np.ndarray:
    """A Noiseprint++ graph's output on `prepared`, computed in exact row bands."""
    height, width = prepared.shape[2:]
    noiseprint = np.empty((1, 1, height, width), np.float32)
    for top, bottom, first, last in noiseprint_row_bands(height, max(1, NOISEPRINT_BAND_PIXELS // width)):
        rows = np.ascontiguousarray(prepared[:, :, first:last])
        band = session.run([OUTPUT_NAMES[2]], {INPUT_NAME: rows})[0]
        noiseprint[:, :, top:bottom] = band[:, :, top - first:bottom - first]
    return noiseprint


class NetworkRuns:
    """Whole-network graphs (TensorRT-shaped, any precision) run on a fixed list of inputs.

    Most of a precision plan's trials change only what comes after Noiseprint++, which is 58%
    of a 256 px run and a third of a 1536x2048 one: each graph runs as two parts, Noiseprint++
    and the rest, and Noiseprint++'s outputs are kept per distinct Noiseprint++ part (by the
    SHA-256 of its serialized graph), so a trial that leaves it as it was runs only the rest.
    Self-attention runs in row chunks where the inputs are large (precision/row_chunks.py)."""

    def __init__(self, inputs: list, attention_chains=()):
        self.inputs, self.attention_chains = inputs, list(attention_chains)
        self._noiseprint = {}  # digest -> Noiseprint++ output per input

    def _noiseprint_outputs(self, part: onnx.ModelProto) -> list:
        serialized = part.SerializeToString()
        key = hashlib.sha256(serialized).digest()
        if key not in self._noiseprint:
            session = create_session(serialized)
            if len(self._noiseprint) >= NOISEPRINT_RUNS_KEPT:
                del self._noiseprint[next(iter(self._noiseprint))]
            self._noiseprint[key] = [_in_row_bands(session, x) for x in self.inputs]
        return self._noiseprint[key]

    def _rest_session(self, rest: onnx.ModelProto):
        largest = max(self.inputs, key=lambda x: x.shape[2] * x.shape[3])
        attention_in_row_chunks(rest, self.attention_chains, row_chunks_for(*largest.shape[2:]))
        return create_session(rest.SerializeToString())

    def raw_outputs(self, graph: onnx.ModelProto) -> list:
        """The graph's RawOutputs on each input."""
        parts = cut_after_noiseprint(graph)
        noiseprints = self._noiseprint_outputs(parts["noiseprint"])
        session = self._rest_session(parts["rest"])
        logits = [output.name for output in session.get_outputs()]
        outputs = []
        for prepared, noiseprint in zip(self.inputs, noiseprints):
            values = dict(zip(logits, session.run(logits, {INPUT_NAME: prepared, OUTPUT_NAMES[2]: noiseprint})))
            outputs.append(RawOutputs.from_batch_of_one(values[OUTPUT_NAMES[0]], values[OUTPUT_NAMES[1]], noiseprint))
        return outputs


def reference_analyses(runs: NetworkRuns, model: onnx.ModelProto, head) -> list:
    return [postprocess(raw, head) for raw in runs.raw_outputs(model)]


def output_errors(ours, truth) -> dict:
    """Max abs change of each published output of one image (inf where non-finite)."""
    pairs = {"map": (ours.localization_map, truth.localization_map),
             "conf": (ours.confidence_map, truth.confidence_map),
             "score": (ours.score, truth.score),
             "np++": (ours.noiseprint, truth.noiseprint)}
    errors = {}
    for name, (left, right) in pairs.items():
        error = float(np.max(np.abs(np.asarray(left, np.float64) - np.asarray(right, np.float64))))
        errors[name] = error if np.isfinite(error) else float("inf")
    return errors


def worst_by_output(by_size: dict) -> dict:
    """The worst deviation of each output over several measurements (e.g. one per size)."""
    return {name: max(errors[name] for errors in by_size.values()) for name in OUTPUTS} if by_size else {}


def deviation(candidate: onnx.ModelProto, reference: list, runs: NetworkRuns, head) -> dict:
    """Worst change of each output over the runs' inputs, against the reference analyses, and
    how many decisions flipped (`flipped`)."""
    worst = {**dict.fromkeys(OUTPUTS, 0.0), "flipped": 0}
    for raw, truth in zip(runs.raw_outputs(candidate), reference):
        ours = postprocess(raw, head)
        for name, error in output_errors(ours, truth).items():
            worst[name] = max(worst[name], error)
        worst["flipped"] += decision_flipped(ours.score, truth.score)
    return worst
