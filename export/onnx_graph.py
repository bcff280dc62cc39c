"""PyTorch TruFor -> a clean, checked FP32 ONNX graph with symbolic batch, height and width."""

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ..architecture import EMBED_DIMS
from ..engine.runner import INPUT_NAME, OUTPUT_NAMES
from ..graphsurgeon import quiet_graphsurgeon
from ..model.attention import attention_form

DEFAULT_OPSET = 18  # Reduce* axes become inputs (initializers); TensorRT 10.3 parses 9..20
SUPPORTED_OPSETS = range(17, 21)  # 17 brings LayerNormalization; 20 is TensorRT 10.3's newest
# onnx >= 1.23 writes IR 14, which onnxruntime 1.31 refuses; IR 10 covers every opset above.
IR_VERSION = 10
ORT_CONTRIB_DOMAIN = "com.microsoft"
TRACE_SIZE = (64, 96)  # any legal size: every shape in the graph stays symbolic

NOISEPRINT = OUTPUT_NAMES[2]
FEATURES = ("c1", "c2", "c3", "c4")
_FULL_AXES = {0: "batch", 2: "height", 3: "width"}
_GRID_AXES = {0: "batch", 2: "grid_height", 3: "grid_width"}
DYNAMIC_AXES = {
    INPUT_NAME: _FULL_AXES,
    "localization_logits": _GRID_AXES,
    "confidence_logits": _GRID_AXES,
    NOISEPRINT: _FULL_AXES,
    **{name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in FEATURES},
}


def band_input_names() -> tuple:
    """The decoder band graph's inputs: c1's band rows, then per coarse scale (c4, c3, c2)
    the rows the band reads and its bilinear taps (see DecoderHead.band)."""
    names = ["c1_rows"]
    for scale in ("c4", "c3", "c2"):
        names += [f"{scale}_rows", f"{scale}_row_taps", f"{scale}_row_weight",
                  f"{scale}_column_taps", f"{scale}_column_weight"]
    return tuple(names)


BAND_INPUTS = band_input_names()
# Graph part -> (input names, output names); see GraphVariant.part.
PART_IO = {
    "whole": ((INPUT_NAME,), OUTPUT_NAMES),
    "noiseprint": ((INPUT_NAME,), (NOISEPRINT,)),
    "features": ((INPUT_NAME, NOISEPRINT), FEATURES),
    "decoder-band": (BAND_INPUTS, OUTPUT_NAMES[:2]),
}


class _Part(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network


class _NoiseprintPart(_Part):
    def forward(self, image):
        return self.network.dncnn(image)


class _FeaturesPart(_Part):
    def forward(self, image, noiseprint):
        return tuple(self.network.features(image, noiseprint))


class _DecoderBandPart(_Part):
    def forward(self, c1_rows, *coarse):
        scales = [coarse[index:index + 5] for index in range(0, len(coarse), 5)]
        return (self.network.decode_head.band(c1_rows, scales),
                self.network.decode_head_conf.band(c1_rows, scales))


def _part_module(network, part: str) -> torch.nn.Module:
    return {"whole": network, "noiseprint": _NoiseprintPart(network),
            "features": _FeaturesPart(network), "decoder-band": _DecoderBandPart(network)}[part]


def _band_examples() -> tuple:
    """A band of 3 rows of a 5 x 7 grid, with taps reading 2 rows of each coarse scale."""
    examples = [torch.rand(1, EMBED_DIMS[0], 3, 7)]
    for channels in reversed(EMBED_DIMS[1:]):
        examples += [torch.rand(1, channels, 2, 4), torch.tensor([[0, 0, 1], [1, 1, 1]]),
                     torch.rand(3), torch.randint(0, 4, (2, 7)), torch.rand(7)]
    return tuple(examples)


def _examples(part: str) -> tuple:
    if part == "decoder-band":
        return _band_examples()
    inputs = PART_IO[part][0]
    return tuple(torch.rand(1, 3 if name == INPUT_NAME else 1, *TRACE_SIZE) for name in inputs)


def _band_axes() -> dict:
    axes = {"c1_rows": {0: "batch", 2: "band", 3: "grid_width"}}
    for scale in ("c4", "c3", "c2"):
        axes.update({f"{scale}_rows": {0: "batch", 2: f"{scale}_band", 3: f"{scale}_width"},
                     f"{scale}_row_taps": {1: "band"}, f"{scale}_row_weight": {0: "band"},
                     f"{scale}_column_taps": {1: "grid_width"},
                     f"{scale}_column_weight": {0: "grid_width"}})
    return axes


def _dynamic_axes(part: str) -> dict:
    inputs, outputs = PART_IO[part]
    known = {**DYNAMIC_AXES, **_band_axes()}
    if part == "decoder-band":
        known.update({name: {0: "batch", 2: "band", 3: "grid_width"} for name in outputs})
    return {name: known[name] for name in (*inputs, *outputs)}


def _trace_to_onnx(network, path: Path, attention: str, opset: int, part: str) -> None:
    """The TorchScript exporter, on purpose: it emits our ORT contrib attention node from a
    plain `symbolic`, and needs no onnxscript (the torch.export-based one would)."""
    inputs, outputs = PART_IO[part]
    examples = _examples(part)
    has_attention = part in ("whole", "features")
    custom = {ORT_CONTRIB_DOMAIN: 1} if attention == "onnxruntime" and has_attention else None
    with attention_form(attention), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_part_module(network, part), examples, str(path), dynamo=False,
                          opset_version=opset, input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=_dynamic_axes(part), custom_opsets=custom,
                          do_constant_folding=True)
    network.eval()  # the exporter restores the training flag it found, which may not be eval


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


def export_graph(network, path: Path, attention: str = "tensorrt", opset: int = DEFAULT_OPSET,
                 part: str = "whole") -> onnx.ModelProto:
    """Write a part (see PART_IO) of `network` (eval mode) to `path`; returns the saved graph."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} not supported; choose {SUPPORTED_OPSETS.start}.."
                         f"{SUPPORTED_OPSETS.stop - 1}")
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        _trace_to_onnx(network, raw, attention, opset, part)
        model = clean_graph(onnx.load(raw))
    _check(model, attention)
    onnx.save(model, path)
    return model
