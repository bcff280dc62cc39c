"""Multi-head attention softmax(q k^T / sqrt(d)) v in the forms the backends want.

The math is the same in every form; what differs is how it reaches a graph:
- `eager` (PyTorch): F.scaled_dot_product_attention, which on the CPU never keeps the full
  score matrix (flash-style kernel).
- `tensorrt` (the exported FP32 graph): Mul(q, 1/sqrt(d)) -> MatMul(q, k^T) -> Softmax ->
  MatMul(., v), the pattern TensorRT's multi-head-attention fusion recognises. Scaling q
  before the first MatMul is exact here: every head has d = 64, so the scale is 1/8, a power
  of two, and multiplying by it rounds nothing. (The opset-23 Attention op would also do, but
  TensorRT 10.3 on JetPack 6 cannot parse it.)
- `onnxruntime` (the CPU graph variant): one com.microsoft.MultiHeadAttention node, which ONNX
  Runtime runs with its CPU flash-attention kernel in bounded memory.
"""

import torch
import torch.nn.functional as F

from trufor_trt.model.layers import merge_heads, split_heads

def _eager(query, key, value, heads: int, scale: float) -> torch.Tensor:
    return merge_heads(F.scaled_dot_product_attention(
        split_heads(query, heads), split_heads(key, heads), split_heads(value, heads), scale=scale))


def _scaled_query_first(query, key, value, heads: int, scale: float) -> torch.Tensor:
    scores = (split_heads(query, heads) * scale) @ split_heads(key, heads).transpose(-2, -1)
    return merge_heads(scores.softmax(dim=-1) @ split_heads(value, heads))


class _OnnxRuntimeMultiHeadAttention(torch.autograd.Function):
    """Runs as eager attention; exports as one com.microsoft.MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float):
        return _eager(query, key, value, heads, scale)

    @staticmethod
    def symbolic(graph, query, key, value, heads: int, scale: float):
        output = graph.op("com.microsoft::MultiHeadAttention", query, key, value,
                          num_heads_i=heads, scale_f=scale)
        output.setType(query.type())
        return output


def multi_head_attention(query, key, value, heads: int, scale: float, form: str) -> torch.Tensor:
    """query B x N x C, key and value B x L x C (heads side by side) -> B x N x C, computed in
    attention form `form` (Formulation.attention). `scale` is a Python number so that no
    graph computes it from a traced shape."""
    if form == "tensorrt":
        return _scaled_query_first(query, key, value, heads, scale)
    if form == "onnxruntime":
        return _OnnxRuntimeMultiHeadAttention.apply(query, key, value, heads, scale)
    return _eager(query, key, value, heads, scale)
