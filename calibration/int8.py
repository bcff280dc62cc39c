"""INT8 with explicit Q/DQ on chosen nodes, calibrated on real images (ONNX Runtime's static
quantizer): symmetric INT8 (zero points 0, as TensorRT requires), float biases (TensorRT
dequantizes INT8, not INT32, and fuses biases itself), weights per output channel or per
tensor, activations per tensor, from one of three calibration methods. Which nodes earn INT8
is export/int8_plan.py's decision; this module only quantizes them.

Calibration runs once per method and set of images (ranges for every tensor, cached in a
folder of the caller's), so that quantizing another subset of nodes costs no new calibration.
"""

import contextlib
import io
import logging
from pathlib import Path

import onnx

QUANTIZED_OPERATORS = ("Conv", "MatMul", "Gemm")
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over feeds (input name -> array)."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def describe(method: str, per_channel: bool) -> dict:
    """The manifest's record of a quantization."""
    return {"method": method, "activations": "int8, symmetric, per tensor",
            "weights": f"int8, symmetric, per {'output channel' if per_channel else 'tensor'}",
            "biases": "float", "operators": list(QUANTIZED_OPERATORS)}


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quantizer_quietly():
    """The quantizer advises (on the root logger, at every call) to pre-process the graph first;
    its pre-processing optimises the graph, which may fuse or rename the nodes this module
    selects by name, so it is not run, and a user need not be told to. Its calibrators print
    their progress ("Collecting tensor data ..."): the plan says its own steps instead."""
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_nodes(fp32_graph: Path, feeds: list, nodes: set, method: str, per_channel: bool,
                   cache_folder: Path) -> onnx.ModelProto:
    """The FP32 graph with Q/DQ around exactly `nodes` (convolutions and matrix products),
    calibrated on `feeds` (one dict of the graph's inputs per image); its IR version is the
    quantizer's (the caller sets the one it needs)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: one of {', '.join(CALIBRATION_METHODS)}")
    output = Path(cache_folder) / f"int8-{method}-{'channel' if per_channel else 'tensor'}.onnx"
    with _quantizer_quietly():
        quantize_static(str(fp32_graph), str(output), _Reader(feeds) if feeds else None,
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPERATORS), nodes_to_quantize=sorted(nodes),
                        calibrate_method=getattr(CalibrationMethod, method),
                        calibration_cache_path=str(Path(cache_folder) / f"ranges-{method}.json"),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})
    quantized = onnx.load(output)
    output.unlink()
    return quantized


def _bypass(quantize, dequantize, producer: dict, graph_outputs: set, renames: dict) -> None:
    """Readers of the pair's output are to read its input instead (a graph output keeps its
    name: the input's producer then writes it); recorded in `renames`, applied at the end."""
    source, target = quantize.input[0], dequantize.output[0]
    if target in graph_outputs and source in producer:
        writer = producer[source]
        writer.output[list(writer.output).index(source)] = target
        dequantize.output[0] = f"{target}/bypassed"  # read by nothing now: dropped
        renames[source] = target
    else:
        renames[target] = source


def _apply_renames(nodes, renames: dict) -> None:
    """Every input named in `renames` reads its final name (bypassed pairs may follow each other)."""
    def final(name: str) -> str:
        seen = set()
        while name in renames and name not in seen:
            seen.add(name)
            name = renames[name]
        return name

    for node in nodes:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = final(name)


def keep_int8_only(quantized: onnx.ModelProto, fp32: onnx.ModelProto, nodes: set) -> onnx.ModelProto:
    """`quantized` (Q/DQ around a superset of `nodes`) with only `nodes` in INT8: a Q/DQ pair
    on an activation stays where a node of `nodes` writes or reads it, and other nodes read
    their FP32 weights again. Quantizing once and subsetting costs no quantizer run per trial."""
    from trufor_trt.precision.blocks import graph_links
    from trufor_trt.precision.fp16 import finish_graph
    from trufor_trt.precision.weight_store import copy_without_weights

    graph = copy_without_weights(quantized)
    producer, readers = graph_links(graph)
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    fp32_weights = {init.name: init for init in fp32.graph.initializer}
    restored, renames = {}, {}
    graph_outputs = {output.name for output in graph.graph.output}
    for dequantize in [node for node in graph.graph.node if node.op_type == "DequantizeLinear"]:
        quantize = producer.get(dequantize.input[0])
        users = readers.get(dequantize.output[0], [])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            writer = producer.get(quantize.input[0])
            if not any(node.name in nodes for node in users) and (writer is None or writer.name not in nodes):
                _bypass(quantize, dequantize, producer, graph_outputs, renames)
            else:  # a node out of INT8 reads what the pair quantizes, not its quantized value
                for user in users:
                    if user.name not in nodes:
                        user.input[list(user.input).index(dequantize.output[0])] = quantize.input[0]
            continue
        for user in users:  # a quantized weight
            if user.name not in nodes and user.name in fp32_nodes:
                index = list(user.input).index(dequantize.output[0])
                original = fp32_nodes[user.name].input[index]
                user.input[index] = original
                restored[original] = fp32_weights[original]
    _apply_renames(graph.graph.node, renames)
    present = {init.name for init in quantized.graph.initializer}
    # finish_graph drops the Q/DQ nodes nothing reads any more, and the weights they read.
    return finish_graph(graph, list(graph.graph.node), [*quantized.graph.initializer, *(
        init for name, init in restored.items() if name not in present)])
