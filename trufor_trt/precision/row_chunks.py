"""Self-attention in row chunks, for measuring graphs on the CPU in bounded memory.

The TensorRT-shaped graph keeps attention unfused (TensorRT fuses it on the GPU), so ONNX
Runtime holds each score matrix whole: 2.4 GB for stage 1 at 1536x2048, twice (scores and
their softmax), and its arena then kept 11 GB for one simulated run. Every row of
`softmax(q k^T) v` depends only on the same row of q, so the chain's nodes (with any Casts the
FP16 simulation put between them) are run once per chunk of q's rows and the rows concatenated:
the score matrices a chunk at a time, and the same values (bit for bit on the network, whose
chunks have thousands of rows; a GEMM kernel may order a row's sums differently for chunks of a
few rows).
"""

import math

import onnx
from onnx import helper

from trufor_trt.architecture import HEADS, REDUCTION_RATIOS, stage_grids
from trufor_trt.precision.blocks import graph_links

CHUNK_BYTES = 256 * 1024 ** 2  # the largest score chunk kept at once
ROW_WISE = frozenset({"MatMul", "Softmax", "Cast"})  # maps row i of its first input to row i


def row_chunks_for(height: int, width: int) -> int:
    """How many row chunks keep every float32 score matrix of an H x W image within CHUNK_BYTES
    (at most the fewest query rows of any stage)."""
    grids = stage_grids(height, width)
    largest = max(4 * heads * h * w * (h // ratio) * (w // ratio)
                  for (h, w), heads, ratio in zip(grids, HEADS, REDUCTION_RATIOS))
    return max(1, min(math.ceil(largest / CHUNK_BYTES), min(h * w for h, w in grids)))


def _region(scores: onnx.NodeProto, context: onnx.NodeProto, readers: dict) -> list | None:
    """The nodes from the scores MatMul to the context MatMul, if every one of them is row-wise
    and only the context's output leaves them; else None (the chain stays whole)."""
    region, pending = {scores.name: scores}, [scores]
    while pending:
        node = pending.pop()
        if node.name == context.name:
            continue
        for output in node.output:
            for reader in readers.get(output, []):
                if reader.name not in region:
                    region[reader.name] = reader
                    pending.append(reader)
    nodes = list(region.values())
    if context.name not in region or any(node.op_type not in ROW_WISE for node in nodes):
        return None
    if any(attribute.name == "axis" and attribute.i not in (-1, 3) for node in nodes
           if node.op_type == "Softmax" for attribute in node.attribute):
        return None
    return nodes


def _chunk(region: list, scores, context, chunks: int, name: str) -> list:
    """Nodes computing the region once per chunk of `scores`' first input's rows, then the
    context's output as their concatenation."""
    made = {output for node in region for output in node.output}
    rows = scores.input[0]
    parts = [f"{name}/query_rows{index}" for index in range(chunks)]
    nodes = [helper.make_node("Split", [rows], parts, axis=-2, num_outputs=chunks, name=f"{name}/split")]
    for index, part in enumerate(parts):
        def renamed(tensor: str) -> str:
            if tensor == rows:
                return part
            return f"{tensor}/rows{index}" if tensor in made else tensor

        for node in region:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}/rows{index}"
            copy.input[:] = [renamed(tensor) for tensor in node.input]
            copy.output[:] = [renamed(tensor) for tensor in node.output]
            nodes.append(copy)
    nodes.append(helper.make_node("Concat", [f"{context.output[0]}/rows{index}" for index in range(chunks)],
                                  [context.output[0]], axis=-2, name=f"{name}/concat"))
    return nodes


def attention_in_row_chunks(model: onnx.ModelProto, chains: list, chunks: int) -> None:
    """Rewrites `model` in place: each chain of `chains` (attention_chains: the scaled query,
    scores, softmax and context node names) found in it runs in `chunks` row chunks."""
    if chunks <= 1:
        return
    _, readers = graph_links(model)
    by_name = {node.name: node for node in model.graph.node}
    replaced = {}
    for _, scores_name, _, context_name in chains:
        scores, context = by_name.get(scores_name), by_name.get(context_name)
        region = _region(scores, context, readers) if scores is not None and context is not None else None
        if region is not None:
            replaced[context_name] = (region, _chunk(region, scores, context, chunks, scores_name))
    dropped = {node.name for region, _ in replaced.values() for node in region}
    nodes = []
    for node in model.graph.node:
        if node.name in replaced:
            nodes += replaced[node.name][1]  # where the context was: every input is made before it
        elif node.name not in dropped:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
