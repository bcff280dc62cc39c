"""The TensorRT chain's part graphs, cut out of a TensorRT-shaped whole graph of any precision.

A camera-sized image does not fit one engine on a small Jetson (Noiseprint++'s 64 channels at
full resolution), so TensorRT runs the network as a chain (engine/chain.py): Noiseprint++ in row
bands, the encoder on the whole image, the decoders in bands. The first two parts are cut from
the folder's fp32 / fp16 / int8 graph itself, so each keeps that graph's nodes, types and Q/DQ
exactly (the precision plan applies per part for free); the encoder's four maps leave it as
float32, channels last, the tensors the decoder graphs take. The decoders are the folder's FP32
decoder graphs in every precision (under 1% of the FLOPs; FP32 costs nothing there).
"""

import re

import onnx
from onnx import TensorProto, helper

from trufor_trt.engine.chain import DECODER_VARIANTS, NOISEPRINT
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.runner import INPUT_NAME
from trufor_trt.errors import TruforError
from trufor_trt.export.onnx_graph import FEATURES, IR_VERSION

DECODER_HEADS = ("/decode_head/", "/decode_head_conf/")
# The part graphs of a chain, in the order it runs them, and where each comes from.
CHAIN_PARTS = ("noiseprint", "encoder", "decoder-maps", "decoder-band")


class ChainCutError(TruforError):
    """A whole graph the chain's parts cannot be cut from."""


def _producers(graph) -> dict:
    return {output: node for node in graph.node for output in node.output}


def _needed_nodes(graph, outputs, inputs) -> list:
    """The nodes `outputs` depend on when `inputs` are given, each after those it reads (the
    precision variants' lowering appends nodes, so the graph's own order may not be one)."""
    producers, ordered, seen = _producers(graph), [], set()
    pending = [(producers.get(tensor), False) for tensor in reversed(outputs) if tensor not in inputs]
    while pending:
        node, inputs_done = pending.pop()
        if node is None or (id(node) in seen and not inputs_done):
            continue
        if inputs_done:
            ordered.append(node)
            continue
        seen.add(id(node))
        pending.append((node, True))
        pending.extend((producers.get(tensor), False) for tensor in node.input
                       if tensor and tensor not in inputs and id(producers.get(tensor)) not in seen)
    return ordered


def _float_input(name: str, channels: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", channels, "height", "width"])


def _subgraph(whole: onnx.ModelProto, name: str, inputs: list, outputs: list, extra_nodes=()) -> onnx.ModelProto:
    """The part of `whole` from `inputs` (value infos) to `outputs` (value infos), with only the
    nodes and weights it uses; `extra_nodes` appended."""
    input_names = {value.name for value in inputs}
    nodes = _needed_nodes(whole.graph, [value.name for value in outputs] + [
        tensor for node in extra_nodes for tensor in node.input], input_names) + list(extra_nodes)
    used = {tensor for node in nodes for tensor in node.input}
    weights = [tensor for tensor in whole.graph.initializer if tensor.name in used]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=whole.opset_import, producer_name="trufor-trt chain")
    model.ir_version = IR_VERSION
    return model


def with_outputs(whole: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """A copy of `whole` that also outputs `tensors` (their types left to the runtime)."""
    copy = onnx.ModelProto.FromString(whole.SerializeToString())
    known = {value.name for value in copy.graph.output} | {value.name for value in copy.graph.input}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in sorted(tensors)
                             if name not in known)
    return copy


def cut_from(whole: onnx.ModelProto, given: set, examples: dict) -> onnx.ModelProto:
    """The part of `whole` that computes its outputs when the tensors `given` are fed as well
    (`examples`: a value of each, for its type and rank); inputs it no longer reads dropped."""
    own_inputs = {value.name for value in whole.graph.input}
    outputs = list(whole.graph.output)
    read = {tensor for node in _needed_nodes(whole.graph, [value.name for value in outputs], own_inputs | given)
            for tensor in node.input}
    fed = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(examples[name].dtype),
                                         [None] * examples[name].ndim) for name in sorted(given & read)]
    return _subgraph(whole, whole.graph.name, [value for value in whole.graph.input if value.name in read] + fed,
                     outputs)


def _made_of_weights(graph) -> set:
    """The tensors computed from weights and constants alone (an INT8 plan's DequantizeLinear of
    a quantized weight, a Cast of a weight to float16), the weights themselves included."""
    made = {tensor.name for tensor in graph.initializer}
    grew = True
    while grew:  # a lowered graph's order need not be topological
        before = len(made)
        made.update(output for node in graph.node if all(not tensor or tensor in made for tensor in node.input)
                    for output in node.output)
        grew = len(made) > before
    return made


def _before_casts_and_quantization(tensor: str, producers: dict) -> str:
    """The tensor that `tensor` is a Cast or a quantize-dequantize of (through any number of
    them), else `tensor`."""
    node = producers.get(tensor)
    while node is not None and node.op_type in ("Cast", "QuantizeLinear", "DequantizeLinear"):
        tensor = node.input[0]
        node = producers.get(tensor)
    return tensor


def encoder_maps(whole: onnx.ModelProto) -> list:
    """The four tensors the decoder heads read (c1..c4, in the precision the encoder writes
    them): before the Casts and Q/DQ that only the decoders read through (an INT8 decoder's
    quantized input, a float16 decoder's cast), as the chain's decoders are FP32."""
    graph = whole.graph
    heads = [node for node in graph.node if node.name.startswith(DECODER_HEADS)]
    made_inside = {output for node in heads for output in node.output}
    weights, producers = _made_of_weights(graph), _producers(graph)
    read = {_before_casts_and_quantization(tensor, producers) for node in heads for tensor in node.input
            if tensor and tensor not in made_inside and tensor not in weights and tensor in producers}
    by_scale = {}
    for tensor in read:
        match = re.search(r"FFMs\.(\d)/", tensor)
        if match is None:
            raise ChainCutError(f"the decoders read {tensor}, which is not one of the encoder's fused maps")
        by_scale.setdefault(int(match.group(1)), set()).add(tensor)
    if sorted(by_scale) != [0, 1, 2, 3] or any(len(tensors) != 1 for tensors in by_scale.values()):
        raise ChainCutError(f"expected the decoders to read the encoder's four fused maps, found {sorted(read)}")
    return [by_scale[scale].pop() for scale in range(4)]


def _channels_last(tensor: str, name: str) -> list:
    """float32 (a no-op where it already is), then N x H x W x C: the decoder graphs' layout."""
    as_float = f"{name}/chain/float32"
    return [helper.make_node("Cast", [tensor], [as_float], name=as_float, to=TensorProto.FLOAT),
            helper.make_node("Transpose", [as_float], [name], name=f"{name}/chain/channels_last", perm=[0, 2, 3, 1])]


def cut_chain_parts(whole: onnx.ModelProto) -> dict:
    """{"noiseprint": image -> Noiseprint++, "encoder": (image, Noiseprint++) -> c1..c4 channels
    last, float32}, both cut from `whole` (a TensorRT-shaped graph, any precision)."""
    image, noiseprint = _float_input(INPUT_NAME, 3), _float_input(NOISEPRINT, 1)
    noiseprint_part = _subgraph(whole, "trufor_chain_noiseprint", [image], [noiseprint])
    maps = encoder_maps(whole)
    extra = [node for tensor, name in zip(maps, FEATURES) for node in _channels_last(tensor, name)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", f"{name}_height", f"{name}_width",
                                                                       None]) for name in FEATURES]
    encoder_part = _subgraph(whole, "trufor_chain_encoder", [_float_input(INPUT_NAME, 3), noiseprint], outputs,
                             extra)
    return {"noiseprint": noiseprint_part, "encoder": encoder_part}


def cut_after_noiseprint(whole: onnx.ModelProto) -> dict:
    """{"noiseprint": image -> Noiseprint++, "rest": (image, Noiseprint++) -> the two logits},
    cut from `whole` (any graph with the network's inputs and outputs)."""
    image, noiseprint = _float_input(INPUT_NAME, 3), _float_input(NOISEPRINT, 1)
    noiseprint_part = _subgraph(whole, "trufor_noiseprint", [image], [noiseprint])
    logits = [output for output in whole.graph.output if output.name != NOISEPRINT]
    rest = _subgraph(whole, "trufor_after_noiseprint", [_float_input(INPUT_NAME, 3), noiseprint], logits)
    in_noiseprint = {node.name for node in noiseprint_part.graph.node if node.op_type != "Constant"}
    shared = [node.name for node in rest.graph.node if node.name in in_noiseprint]
    if shared:
        raise ChainCutError(f"the network after Noiseprint++ reads inside it (at {shared[0]})")
    return {"noiseprint": noiseprint_part, "rest": rest}


def join_after_noiseprint(noiseprint_part: onnx.ModelProto, rest: onnx.ModelProto,
                          whole: onnx.ModelProto) -> onnx.ModelProto:
    """The two parts of cut_after_noiseprint (the rest perhaps changed, e.g. quantized) as one
    graph with `whole`'s inputs and outputs, in the rest's opset and IR version."""
    graph = helper.make_graph([*noiseprint_part.graph.node, *rest.graph.node], whole.graph.name,
                              list(whole.graph.input), list(whole.graph.output),
                              initializer=[*noiseprint_part.graph.initializer, *rest.graph.initializer])
    joined = helper.make_model(graph, opset_imports=rest.opset_import, producer_name=rest.producer_name)
    joined.ir_version = rest.ir_version
    return joined


def chain_part_graphs(model: ModelDir, precision: str) -> dict:
    """Part name -> serialized graph, for each of CHAIN_PARTS: the first two cut from the folder's
    `precision` graph, the decoders its FP32 decoder graphs."""
    cut = cut_chain_parts(onnx.load(model.variant_path(precision)))
    graphs = {name: part.SerializeToString() for name, part in cut.items()}
    graphs.update({part: model.variant_path(variant).read_bytes() for part, variant in DECODER_VARIANTS.items()})
    return {part: graphs[part] for part in CHAIN_PARTS}
