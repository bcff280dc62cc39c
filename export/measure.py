"""How far a graph variant moves the published outputs from the FP32 graph, on the CPU."""

import numpy as np
import onnx

from trufor_trt.engine.onnxruntime_runner import create_session, run_session
from trufor_trt.engine.postprocess import decision_flipped, postprocess

OUTPUTS = ("map", "conf", "score", "np++")


def create_session_from_model(model: onnx.ModelProto):
    return create_session(model.SerializeToString())


def reference_analyses(model: onnx.ModelProto, inputs: list, head) -> list:
    session = create_session_from_model(model)
    return [postprocess(run_session(session, prepared), head) for prepared in inputs]


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


def deviation(candidate: onnx.ModelProto, reference: list, inputs: list, head) -> dict:
    """Worst change of each output over the inputs, against the reference analyses, and how
    many decisions flipped (`flipped`)."""
    session = create_session_from_model(candidate)
    worst = {**dict.fromkeys(OUTPUTS, 0.0), "flipped": 0}
    for prepared, truth in zip(inputs, reference):
        ours = postprocess(run_session(session, prepared), head)
        for name, error in output_errors(ours, truth).items():
            worst[name] = max(worst[name], error)
        worst["flipped"] += decision_flipped(ours.score, truth.score)
    return worst
