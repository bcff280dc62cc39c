"""`trufor-trt export --precision fp16|int8`: reduced-precision graphs added to a model folder.

Each variant is built from the folder's FP32 TensorRT graph, measured against it on the
calibration images on the CPU (ONNX Runtime; FP16 parts simulated, see precision/fp16.py), and
recorded in the manifest with its calibration set, its decisions and its deviation.
"""

import json
from dataclasses import asdict
from pathlib import Path

import onnx

from ..calibration.images import load_calibration_set
from ..engine.model_dir import MANIFEST_FILE, GraphVariant, ModelDir, sha256_file
from ..errors import TruforError
from ..files import write_atomically
from ..precision.fp16 import lower_to_fp16, upcast_fp16
from ..precision.typing_check import precision_problems
from .measure import deviation, reference_analyses

REDUCED_VARIANTS = {
    "fp16": GraphVariant("fp16", "trufor_fp16.onnx", "tensorrt", "fp16",
                         "TensorRT FP16 engines: blocks that earned FP16, the rest FP32"),
    "int8": GraphVariant("int8", "trufor_int8.onnx", "tensorrt", "int8",
                         "TensorRT INT8 engines: explicit Q/DQ, attention FP16"),
}


def _build(precision: str, fp32_path: Path, fp32: onnx.ModelProto, inputs: list, head, on_step):
    """(graph, names of its float16 nodes, manifest details) of one reduced-precision variant."""
    if precision == "fp16":
        from .fp16_plan import plan_fp16

        plan = plan_fp16(fp32, inputs, head, on_step=on_step)
        return lower_to_fp16(fp32, plan.half_nodes), plan.half_nodes, {"fp16_plan": plan.report()}
    from ..calibration.int8 import METHOD, quantize_int8

    on_step(f"calibrating INT8 on {len(inputs)} images")
    graph, half_nodes = quantize_int8(fp32_path, inputs)
    return graph, half_nodes, {"quantization": METHOD}


def check_precision(graph: onnx.ModelProto, half_nodes: set, precision: str) -> None:
    """Refuse a variant whose types are not exactly its plan (strongly typed TensorRT builds
    compute each node in its inputs' type)."""
    problems = precision_problems(graph, half_nodes)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TruforError(f"the {precision} graph's types do not follow its plan: {shown}")


def add_precision_variant(model_dir, precision: str, calibration_folder, on_step=print) -> dict:
    """Build, measure and record one variant; returns its manifest entry."""
    model = ModelDir.open(model_dir)
    variant = REDUCED_VARIANTS[precision]
    inputs, calibration = load_calibration_set(calibration_folder)
    head = model.detection_head()
    fp32_path = model.variant_path("fp32")
    fp32 = onnx.load(fp32_path)
    graph, half_nodes, details = _build(precision, fp32_path, fp32, inputs, head, on_step)
    check_precision(graph, half_nodes, precision)
    on_step(f"measuring {precision} against fp32 on the calibration images")
    measured = deviation(upcast_fp16(graph), reference_analyses(fp32, inputs, head), inputs, head)
    write_atomically(model.path / variant.file, graph.SerializeToString())
    entry = {**asdict(variant), "calibration": calibration, **details,
             "deviation_vs_fp32": {"max_abs": measured, "measured_on": "the calibration images, "
                                   "ONNX Runtime CPU, float16 storage simulated"}}
    manifest = dict(model.manifest)
    manifest["variants"] = {**manifest["variants"], precision: entry}
    manifest["files"] = {**manifest["files"], variant.file: sha256_file(model.path / variant.file)}
    write_atomically(model.path / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return entry
