"""PyTorch TruFor -> a clean, checked FP32 ONNX graph with symbolic batch, height and width."""

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ..engine.runner import INPUT_NAME, OUTPUT_NAMES
from ..model.attention import attention_form

DEFAULT_OPSET = 18  # Reduce* axes become inputs (initializers); TensorRT 10.3 parses 9..20
SUPPORTED_OPSETS = range(17, 21)  # 17 brings LayerNormalization; 20 is TensorRT 10.3's newest
# onnx >= 1.23 writes IR 14, which onnxruntime 1.31 refuses; IR 10 covers every opset above.
IR_VERSION = 10
ORT_CONTRIB_DOMAIN = "com.microsoft"
TRACE_SIZE = (64, 96)  # any legal size: every shape in the graph stays symbolic

_GRID_AXES = {0: "batch", 2: "grid_height", 3: "grid_width"}
DYNAMIC_AXES = {
    INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
    "localization_logits": _GRID_AXES,
    "confidence_logits": _GRID_AXES,
    "noiseprint": {0: "batch", 2: "height", 3: "width"},
}


def _trace_to_onnx(network, path: Path, attention: str, opset: int) -> None:
    """The TorchScript exporter, on purpose: it emits our ORT contrib attention node from a
    plain `symbolic`, and needs no onnxscript (the torch.export-based one would)."""
    example = torch.rand(1, 3, *TRACE_SIZE)
    custom = {ORT_CONTRIB_DOMAIN: 1} if attention == "onnxruntime" else None
    with attention_form(attention), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=DYNAMIC_AXES, custom_opsets=custom,
                          do_constant_folding=True)
    network.eval()  # the exporter restores the training flag it found, which may not be eval


def quiet_graphsurgeon():
    """onnx-graphsurgeon, logging errors only (its warnings are about our own naming)."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    return gs


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node removal and topological order (onnx-graphsurgeon)."""
    gs = quiet_graphsurgeon()
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = IR_VERSION
    return cleaned


def _check(model: onnx.ModelProto, attention: str) -> None:
    """ONNX checker plus strict shape inference; ONNX itself has no schema for ORT's contrib
    ops, so graphs holding one are checked structurally only."""
    onnx.checker.check_model(model, full_check=attention != "onnxruntime")
    if attention != "onnxruntime":
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def export_graph(network, path: Path, attention: str = "tensorrt",
                 opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write the exported part of `network` (eval mode) to `path`; returns the saved graph."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} not supported; choose {SUPPORTED_OPSETS.start}.."
                         f"{SUPPORTED_OPSETS.stop - 1}")
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        _trace_to_onnx(network, raw, attention, opset)
        model = clean_graph(onnx.load(raw))
    _check(model, attention)
    onnx.save(model, path)
    return model
