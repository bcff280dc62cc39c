"""Where precision is decided in the exported graph: its blocks, and the chains that need care.

Node names come from the PyTorch module path the exporter traced (`/dncnn/...`,
`/backbone/block1/...`), so a node's block is read off its name; the chains are found by
their operator pattern. The FP16 plan, INT8 calibration and their checks all use these.
"""

import re

import onnx

_STREAM_STAGE = re.compile(r"^/backbone/(extra_)?(patch_embed|block|norm)(\d)")
_FUSION_STAGE = re.compile(r"^/backbone/(FRMs|FFMs)\.(\d)")


def block_of(node_name: str) -> str:
    if node_name.startswith("/dncnn/"):
        return "noiseprint++"
    match = _STREAM_STAGE.match(node_name)
    if match:
        return f"{'noiseprint' if match.group(1) else 'rgb'} stream, stage {match.group(3)}"
    match = _FUSION_STAGE.match(node_name)
    if match:
        return f"fusion, stage {int(match.group(2)) + 1}"
    if node_name.startswith("/decode_head_conf/"):
        return "confidence decoder"
    if node_name.startswith("/decode_head/"):
        return "localization decoder"
    return "input normalisation"


def graph_links(model: onnx.ModelProto) -> tuple:
    """(tensor name -> the node that writes it, tensor name -> the nodes that read it)."""
    producer = {output: node for node in model.graph.node for output in node.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def attention_chains(model: onnx.ModelProto) -> list:
    """Every Mul(q, scale) -> MatMul -> Softmax -> MatMul chain, as four node names each:
    the self-attention pattern TensorRT fuses (see model/attention.py)."""
    producer, consumers = graph_links(model)
    chains = []
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        scores = producer.get(softmax.input[0])
        scaled = producer.get(scores.input[0]) if scores is not None and scores.op_type == "MatMul" else None
        after = consumers.get(softmax.output[0], [])
        if scaled is not None and scaled.op_type == "Mul" and len(after) == 1 \
                and after[0].op_type == "MatMul":
            chains.append((scaled.name, scores.name, softmax.name, after[0].name))
    return chains


def pixel_sum_chains(model: onnx.ModelProto) -> list:
    """Every MatMul -> Mul(scale) -> Softmax chain: the fusion modules' cross-attention
    context k^T.v, a sum over all pixels whose magnitude grows with the image size."""
    producer, _ = graph_links(model)
    chains = []
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        scaled = producer.get(softmax.input[0])
        product = producer.get(scaled.input[0]) if scaled is not None and scaled.op_type == "Mul" else None
        if product is not None and product.op_type == "MatMul":
            chains.append((product.name, scaled.name))
    return chains
