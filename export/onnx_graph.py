"""PyTorch TruFor -> a clean, checked FP32 ONNX graph with symbolic batch, height and width."""

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from trufor_trt.architecture import CONFIDENCE_CLASSES, DECODER_DIM, EMBED_DIMS, LOCALIZATION_CLASSES
from trufor_trt.engine.onnxruntime_runner import COARSE, WIDENED
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES
from trufor_trt.graphsurgeon import quiet_graphsurgeon
from trufor_trt.model.decoder import DecoderPair, split_logits
from trufor_trt.model.formulation import Formulation, traced_for

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


MAPS_INPUTS = ("c1_rows", *(f"{scale}_rows" for scale in COARSE))
BAND_INPUTS = ("c1_rows", *WIDENED, *(f"{scale}_vertical" for scale in COARSE))
# Graph part -> (input names, output names); see GraphVariant.part. The CPU graphs' maps are
# channels-last and without the batch axis (model/decoder.py, DecoderPair).
PART_IO = {
    "whole": ((INPUT_NAME,), OUTPUT_NAMES),
    "noiseprint": ((INPUT_NAME,), (NOISEPRINT,)),
    "features": ((INPUT_NAME, NOISEPRINT), FEATURES),
    "decoder-maps": (MAPS_INPUTS, WIDENED),
    "decoder-band": (BAND_INPUTS, OUTPUT_NAMES[:2]),
}


class _Part(torch.nn.Module):
    def __init__(self, network, form: Formulation):
        super().__init__()
        self.network, self.form = network, form

    def pair(self) -> DecoderPair:
        return DecoderPair.of((self.network.decode_head, self.network.decode_head_conf))


class _NoiseprintPart(_Part):
    def forward(self, image):
        return self.network.dncnn(image)


class _FeaturesPart(_Part):
    def forward(self, image, noiseprint):
        return tuple(scale.permute(0, 2, 3, 1) for scale in self.network.features(image, noiseprint, self.form))


class _DecoderMapsPart(_Part):
    def forward(self, c1_rows, *coarse_rows):
        """c1_rows: only its width (the 1/4 grid's) is read."""
        return self.pair().widened_rows(coarse_rows, c1_rows.shape[1])


class _DecoderBandPart(_Part):
    def forward(self, c1_rows, *widened_and_vertical):
        widened, vertical = widened_and_vertical[:len(COARSE)], widened_and_vertical[len(COARSE):]
        return split_logits(self.pair().band_logits(c1_rows, widened, vertical))


def _part_module(network, part: str, form: Formulation) -> torch.nn.Module:
    if part == "whole":
        return network.traced_as(form)  # not wrapped: the graph's node names stay the network's
    parts = {"noiseprint": _NoiseprintPart, "features": _FeaturesPart, "decoder-maps": _DecoderMapsPart,
             "decoder-band": _DecoderBandPart}
    return parts[part](network, form)


def _examples(part: str) -> tuple:
    """Inputs to trace a part with: any legal sizes (every shape in the graph stays symbolic)."""
    c1_rows = torch.rand(3, 7, EMBED_DIMS[0])
    if part == "decoder-maps":
        return (c1_rows, *(torch.rand(2, 4, channels) for channels in reversed(EMBED_DIMS[1:])))
    if part == "decoder-band":
        return (c1_rows, *(torch.rand(2, 7, 2 * DECODER_DIM) for _ in COARSE), *(torch.rand(3, 2) for _ in COARSE))
    inputs = PART_IO[part][0]
    return tuple(torch.rand(1, 3 if name == INPUT_NAME else 1, *TRACE_SIZE) for name in inputs)


def _decoder_axes() -> dict:
    axes = {"c1_rows": {0: "rows", 1: "grid_width"}}
    for scale in COARSE:
        axes.update({f"{scale}_rows": {0: f"{scale}_rows", 1: f"{scale}_width"},
                     f"{scale}_wide": {1: f"{scale}_rows", 2: "grid_width"},
                     f"{scale}_vertical": {0: "rows", 1: f"{scale}_rows"}})
    return axes


def _dynamic_axes(part: str) -> dict:
    inputs, outputs = PART_IO[part]
    known = {**DYNAMIC_AXES, **_decoder_axes()}
    if part == "features":
        known.update({name: {0: "batch", 1: f"{name}_height", 2: f"{name}_width"} for name in FEATURES})
    if part == "decoder-band":
        # the widened rows as the band graph takes them: a slice of the maps graph's, no batch
        known.update({name: {0: f"{scale}_rows", 1: "grid_width"} for scale, name in zip(COARSE, WIDENED)})
        known.update({name: {1: "rows", 2: "grid_width"} for name in outputs})
    return {name: known[name] for name in (*inputs, *outputs)}


def _trace_to_onnx(network, path: Path, attention: str, opset: int, part: str) -> None:
    """The TorchScript exporter, on purpose: it emits our ORT contrib attention node from a
    plain `symbolic`, and needs no onnxscript (the torch.export-based one would)."""
    inputs, outputs = PART_IO[part]
    examples = _examples(part)
    has_attention = part in ("whole", "features")
    custom = {ORT_CONTRIB_DOMAIN: 1} if attention == "onnxruntime" and has_attention else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The exporter cannot fold a strided Slice and says so per export, with its own source
        # paths: nothing is wrong (clean_graph folds what is constant, and every export is then
        # verified against the float64 network), but a newcomer reads it as a failure.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1 can be constant folded",
                                category=UserWarning)
        torch.onnx.export(_part_module(network, part, traced_for(attention)), examples, str(path), dynamo=False,
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


def _fixed_axes(part: str) -> dict:
    """Output axes of the CPU graphs that do not follow the image, by output name."""
    if part == "features":
        return {name: {3: channels} for name, channels in zip(FEATURES, EMBED_DIMS)}
    if part == "decoder-maps":
        return {name: {0: 1, 3: 2 * DECODER_DIM} for name in WIDENED}
    if part == "decoder-band":
        return {OUTPUT_NAMES[0]: {0: LOCALIZATION_CLASSES}, OUTPUT_NAMES[1]: {0: CONFIDENCE_CLASSES}}
    return {}


def _declare_fixed_axes(model: onnx.ModelProto, part: str) -> None:
    """The exporter's shape inference stops at ONNX Runtime's contrib attention and at Resize
    to a computed size, leaving channel counts unknown in the outputs: write them back."""
    fixed = _fixed_axes(part)
    for output in model.graph.output:
        for axis, size in fixed.get(output.name, {}).items():
            dim = output.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size


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
    _declare_fixed_axes(model, part)
    _check(model, attention)
    onnx.save(model, path)
    return model
