"""`trufor-trt export`: checkpoint -> a verified, self-describing model folder, or nothing.

The folder is built under a temporary name beside the target and renamed into place only
after every graph passed verification, so a failed export leaves no model folder behind.
"""

import datetime
import io
import json
import os
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trufor_trt import __version__
from trufor_trt.engine.decode import MIN_SIDE
from trufor_trt.engine.model_dir import DETECTION_HEAD_FILE, FORMAT, FORMAT_VERSION, MANIFEST_FILE, VARIANTS
from trufor_trt.engine.preprocess import INPUT_SCALE
from trufor_trt.engine.runner import INPUT_NAME
from trufor_trt.files import sha256_file
from trufor_trt.installed import distribution_versions
from trufor_trt.model import detection_head_arrays, load_trufor
from trufor_trt.export.graph_rules import tensorrt_shape_problems
from trufor_trt.export.onnx_graph import DEFAULT_OPSET, IR_VERSION, export_graph
from trufor_trt.export.verify import BOUNDS, VERIFY_SIZES, ExportVerificationError, verify_graphs

TOOLS = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy")


def _tool_versions() -> dict:
    return {"trufor-trt": __version__, "python": platform.python_version(),
            **distribution_versions(TOOLS)}


def _contract() -> dict:
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": "RGB",
                  "value": f"uint8 / {INPUT_SCALE:g}", "min_side": MIN_SIDE,
                  "dynamic": ["batch (same-size images)", "height", "width"]},
        "outputs": {
            "localization_logits": {"channels": 2, "grid": "1/4: floor((H - 1) / 4) + 1 x same for W",
                                    "meaning": "logits of (pristine, forged)"},
            "confidence_logits": {"channels": 1, "grid": "1/4, as above",
                                  "meaning": "logit of the reliability map"},
            "noiseprint": {"channels": 1, "grid": "full: H x W", "meaning": "Noiseprint++ map"},
        },
    }


def _write_detection_head(network, folder: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **detection_head_arrays(network))
    (folder / DETECTION_HEAD_FILE).write_bytes(buffer.getvalue())


def _manifest(checkpoint: Path, checkpoint_sha256: str, folder: Path, opset: int,
              deviations: list, variants: tuple) -> dict:
    files = sorted([variant.file for variant in variants] + [DETECTION_HEAD_FILE])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"name": checkpoint.name, "sha256": checkpoint_sha256},
        **_contract(),
        "opset": opset,
        "ir_version": IR_VERSION,
        "variants": {variant.name: asdict(variant) for variant in variants},
        "detection_head": {"file": DETECTION_HEAD_FILE, "layers": "Linear 8->128, ReLU, Linear 128->1",
                           "arrays": ["hidden_weight", "hidden_bias", "output_weight", "output_bias"]},
        "verification": {
            "reference": "the PyTorch network in float64",
            "sizes": [list(size) for size in VERIFY_SIZES],
            "bounds_max_abs": BOUNDS,
            "results": [{"graph": d.graph, "size": list(d.size), "max_abs": d.max_abs}
                        for d in deviations],
        },
        "files": {name: sha256_file(folder / name) for name in files},
        "tools": _tool_versions(),
    }


def _replace_folder(staging: Path, target: Path) -> None:
    """Put the finished folder in place; an old folder at the target is removed after."""
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def export_model_dir(checkpoint, out_dir, opset: int = DEFAULT_OPSET,
                     checkpoint_sha256: str = None, on_step=print, with_tensorrt: bool = True,
                     network=None) -> dict:
    """Export, verify and describe; returns the manifest. Raises TruforError subclasses.
    `with_tensorrt=False` leaves out the TensorRT-shaped graph (half the folder), for machines
    that will only run the CPU graphs; `network`: the checkpoint's network (load_trufor), where
    the caller has loaded it already."""
    variants = tuple(variant for variant in VARIANTS if with_tensorrt or variant.attention != "tensorrt")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    checkpoint_sha256 = checkpoint_sha256 or sha256_file(checkpoint)
    network = network if network is not None else load_trufor(checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for variant in variants:
            on_step(f"exporting {variant.name} ({variant.purpose})")
            graph = export_graph(network, staging / variant.file, variant.attention, opset, variant.part)
            problems = tensorrt_shape_problems(graph) if variant.attention == "tensorrt" else []
            if problems:
                raise ExportVerificationError(f"graph {variant.name} is not TensorRT-shaped: "
                                              + "; ".join(problems))
        _write_detection_head(network, staging)
        on_step("verifying every graph against the float64 network")
        deviations = verify_graphs(network, staging)
        manifest = _manifest(checkpoint, checkpoint_sha256, staging, opset, deviations, variants)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_folder(staging, out_dir)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
