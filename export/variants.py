"""`trufor-trt export --precision fp16|int8`: reduced-precision graphs added to a model folder.

Each variant is built from the folder's FP32 TensorRT graph, measured against it on the
calibration images on the CPU (ONNX Runtime; FP16 parts simulated, see precision/fp16.py), and
recorded in the manifest with its calibration set, its decisions and its deviation.
"""

import json
from dataclasses import asdict
from pathlib import Path

import onnx

from trufor_trt.calibration.images import load_calibration_set
from trufor_trt.engine.model_dir import MANIFEST_FILE, GraphVariant, ModelDir
from trufor_trt.errors import TruforError
from trufor_trt.files import sha256_file, write_atomically
from trufor_trt.precision.flops import flops_by_precision
from trufor_trt.precision.typing_check import precision_problems
from trufor_trt.export.fp16_plan import FLOP_SIZE
from trufor_trt.export.measure import worst_by_output


REDUCED_VARIANTS = {
    "fp16": GraphVariant("fp16", "trufor_fp16.onnx", "tensorrt", "fp16",
                         "TensorRT FP16 engines: layers and blocks that earned FP16, the rest FP32"),
    "int8": GraphVariant("int8", "trufor_int8.onnx", "tensorrt", "int8",
                         "TensorRT INT8 engines: explicit Q/DQ where it earned INT8, the FP16 plan elsewhere"),
}


def _build(model: ModelDir, precision: str, fp32_path: Path, fp32: onnx.ModelProto, inputs: list, large: list,
           head, on_step):
    """(graph, names of its float16 nodes, manifest details, deviation by size: "crops" and each
    full-size image's HxW, as the plan measured its final graph)."""
    if precision == "fp16":
        from trufor_trt.export.fp16_plan import lower_plan, plan_fp16

        plan = plan_fp16(fp32, inputs, head, large_inputs=large, on_step=on_step)
        graph, half_nodes = lower_plan(fp32, plan.half_nodes, plan.conv_forms, plan.centers)
        return graph, half_nodes, {"fp16_plan": plan.report()}, plan.deviation_by_size
    from trufor_trt.export.fp16_plan import recorded_plan
    from trufor_trt.export.int8_plan import plan_int8

    fp16 = model.manifest["variants"].get("fp16", {}).get("fp16_plan")
    if fp16 is None or "units" not in fp16:
        raise TruforError("INT8 is planned on top of the FP16 plan: add the fp16 variant first "
                          "(trufor-trt export --precision fp16 --calib-images DIR)")
    if "noiseprint_centers" not in fp16:
        raise TruforError("the folder's FP16 plan predates centered Noiseprint++: add the fp16 variant again "
                          "(trufor-trt export --precision fp16 --calib-images DIR), then int8")
    plan, graph, half_nodes = plan_int8(fp32, inputs, head, recorded_plan(fp32, fp16),
                                        large_inputs=large, on_step=on_step)
    return graph, half_nodes, {"int8_plan": plan.report(), "quantization": plan.report()["quantization"]}, \
        plan.deviation_by_size


def _coverage(sizes: list, max_shape) -> dict:
    """The largest size measured, and a warning where the engines may take larger images."""
    largest = max((tuple(int(v) for v in size.split("x")) for size in sizes), key=lambda s: s[0] * s[1])
    coverage = {"largest_measured": list(largest), "max_shape": list(max_shape) if max_shape else None}
    if max_shape and (max_shape[0] > largest[0] or max_shape[1] > largest[1]):
        coverage["warning"] = (f"measured up to {largest[0]}x{largest[1]}, but engines up to "
                               f"{max_shape[0]}x{max_shape[1]} were asked for: add full-size images "
                               "to --calib-images (deviation grows with the image)")
    return coverage


def check_precision(graph: onnx.ModelProto, half_nodes: set, precision: str) -> None:
    """Refuse a variant whose types are not exactly its plan (strongly typed TensorRT builds
    compute each node in its inputs' type)."""
    problems = precision_problems(graph, half_nodes)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TruforError(f"the {precision} graph's types do not follow its plan: {shown}")


def add_precision_variant(model_dir, precision: str, calibration_folder, max_shape=None, on_step=print) -> dict:
    """Build, measure and record one variant; returns its manifest entry. `max_shape` (H, W):
    the largest image its engines will take; the plan is checked at full size up to it."""
    model = ModelDir.open(model_dir)
    variant = REDUCED_VARIANTS[precision]
    inputs, large, calibration = load_calibration_set(calibration_folder, max_shape=max_shape)
    head = model.detection_head()
    fp32_path = model.variant_path("fp32")
    fp32 = onnx.load(fp32_path)
    graph, half_nodes, details, measured = _build(model, precision, fp32_path, fp32, inputs, large, head, on_step)
    check_precision(graph, half_nodes, precision)
    worst = worst_by_output(measured)
    sizes = calibration["sizes"]
    flop_sizes = [FLOP_SIZE] + ([tuple(max_shape)] if max_shape else [])
    write_atomically(model.path / variant.file, graph.SerializeToString())
    entry = {**asdict(variant), "calibration": calibration, **details,
             "flops_by_precision": [flops_by_precision(fp32, graph, *size) for size in flop_sizes],
             "size_coverage": _coverage(sizes, max_shape),
             "deviation_vs_fp32": {"max_abs": worst, "by_size": measured, "sizes": sizes,
                                   "measured_on": "the calibration images (crops, and full size up to "
                                   "the max shape), ONNX Runtime CPU, float16 storage simulated"}}
    manifest = dict(model.manifest)
    manifest["variants"] = {**manifest["variants"], precision: entry}
    manifest["files"] = {**manifest["files"], variant.file: sha256_file(model.path / variant.file)}
    write_atomically(model.path / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return entry
