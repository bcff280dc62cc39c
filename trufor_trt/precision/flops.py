"""How many FLOPs of a graph compute in each precision, at a given image size.

Counted like benchmarks/flops.py (and PyTorch's counter): convolutions and matrix products, a
multiply-add being 2 FLOPs. Shapes come from ONNX Runtime's symbolic shape inference (which
follows the Reshapes of the attention that onnx's own inference cannot), on a copy of the
graph whose large weights are replaced by inputs of their shape (nothing is computed).

Two counts per variant: `network`, the FP32 graph's FLOPs by the precision each of its
products computes in within the variant (what the share of reduced precision means), and
`executed`, the variant's own products (a centered convolution adds its float32 offset).
"""

import onnx
from onnx import TensorProto, helper

COUNTED = ("Conv", "MatMul", "Gemm")
PRECISIONS = ("fp32", "fp16", "int8")
_INLINE_LIMIT = 64  # initializers up to this many elements stay (shape constants)


def _shape_only(model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
    """A weightless copy of `model` with the image input fixed to 1 x 3 x height x width."""
    graph = model.graph
    kept, stand_ins = [], []
    for init in graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        if count <= _INLINE_LIMIT:
            kept.append(init)
        else:
            stand_ins.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    image = helper.make_tensor_value_info(graph.input[0].name, TensorProto.FLOAT, [1, 3, height, width])
    copy = helper.make_graph(list(graph.node), graph.name, [image, *stand_ins, *graph.input[1:]],
                             list(graph.output), kept)
    return helper.make_model(copy, opset_imports=model.opset_import, ir_version=model.ir_version)


def _shapes(model: onnx.ModelProto, height: int, width: int) -> dict:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(_shape_only(model, height, width), auto_merge=True)
    graph = inferred.graph
    shapes = {value.name: [dim.dim_value if dim.HasField("dim_value") else None
                           for dim in value.type.tensor_type.shape.dim]
              for value in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    return shapes


def _product(values) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def node_flops(model: onnx.ModelProto, height: int, width: int) -> dict:
    """Node name -> FLOPs, for every convolution and matrix product of `model`."""
    shapes = _shapes(model, height, width)
    flops = {}
    for node in model.graph.node:
        if node.op_type not in COUNTED:
            continue
        output = shapes.get(node.output[0])
        operand = shapes.get(node.input[1] if node.op_type == "Conv" else node.input[0])
        if not output or not operand or None in output or None in operand:
            raise ValueError(f"no shape known for {node.name} at {height}x{width}")
        # Conv: each output takes C_in/groups x kh x kw products; MatMul/Gemm: K = the
        # first operand's last axis (Gemm with transA is not exported by this project).
        per_output = _product(operand[1:]) if node.op_type == "Conv" else operand[-1]
        flops[node.name] = 2 * _product(output) * per_output
    return flops


def _is_int8_operand(name: str, producer: dict, types: dict) -> bool:
    node = producer.get(name)
    return node is not None and node.op_type == "DequantizeLinear" and \
        types.get(node.input[0]) in (TensorProto.INT8, TensorProto.UINT8)


def node_precisions(model: onnx.ModelProto) -> dict:
    """Node name -> the precision its product computes in: int8 where its data input is
    dequantized INT8 (Q/DQ), else the type of its float inputs."""
    from trufor_trt.precision.blocks import graph_links
    from trufor_trt.precision.fp16 import tensor_types

    types = tensor_types(model)
    producer, _ = graph_links(model)
    precisions = {}
    for node in model.graph.node:
        if node.op_type not in COUNTED:
            continue
        if _is_int8_operand(node.input[0], producer, types):
            precisions[node.name] = "int8"
        else:
            half = any(types.get(name) == TensorProto.FLOAT16 for name in node.input[:2])
            precisions[node.name] = "fp16" if half else "fp32"
    return precisions


def _by_precision(flops: dict, precisions: dict) -> dict:
    totals = dict.fromkeys(PRECISIONS, 0)
    for name, count in flops.items():
        totals[precisions.get(name, "fp32")] += count
    return totals


def flops_by_precision(fp32: onnx.ModelProto, variant: onnx.ModelProto, height: int, width: int) -> dict:
    """The manifest's record of one variant at one size: GFLOP per precision, both counts,
    and the share of the network's FLOPs in each precision."""
    precisions = node_precisions(variant)
    network = _by_precision(node_flops(fp32, height, width), precisions)
    executed = _by_precision(node_flops(variant, height, width), precisions)
    total = sum(network.values())
    return {"size": f"{height}x{width}",
            "network_gflop": {key: round(value / 1e9, 2) for key, value in network.items()},
            "executed_gflop": {key: round(value / 1e9, 2) for key, value in executed.items()},
            "network_share": {key: round(value / total, 4) for key, value in network.items()}}
