"""Mixed precision written into the ONNX graph itself (TensorRT 11 takes precision from there).

- `lower_to_fp16(graph, nodes)`: the chosen nodes read and write float16 tensors (their float
  weights converted, Casts at the borders); graph inputs and outputs stay float32. This is
  the graph TensorRT builds.
- `upcast_fp16(graph)`: runs any such graph on a CPU. ONNX Runtime's CPU provider has almost
  no float16 kernels, so every float16 tensor becomes float32 *rounded to float16* (a Cast to
  float16 and back after each node that wrote float16). This proves the effect of storing every
  weight and activation of those nodes in float16 (rounding, and overflow to inf where a value
  leaves the float16 range); it does not prove the effect of float16 arithmetic inside a kernel
  (TensorRT accumulates most convolutions and matrix products in float32, but its fused kernels
  and tactics are its own), which only a run on the GPU shows.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


# Float inputs that are parameters, not data: they keep their type (Resize's roi and scales).
PARAMETER_INPUTS = {"Resize": {1, 2}}
HALF_SUFFIX = "/fp16"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def tensor_types(model: onnx.ModelProto) -> dict:
    """Element type of every tensor whose type shape inference can tell. Inferred on a copy
    whose initializers are stand-in inputs: types need no weights, and copying ~270 MB of
    them into the inference made each FP16 trial seconds slower."""
    graph = model.graph
    stand_ins = [helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                 for init in graph.initializer]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), graph.name, [*graph.input, *stand_ins], list(graph.output)),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    return {info.name: info.type.tensor_type.elem_type
            for info in [*inferred.value_info, *inferred.input, *inferred.output]}


def _cast(source: str, target: str, to: int, role: str) -> onnx.NodeProto:
    """A Cast named after its output and its role, so the two passes never collide."""
    return helper.make_node("Cast", [source], [target], to=to, name=f"{target}/{role}")


def _drop_unread(nodes: list, outputs: set) -> list:
    """`nodes` without those whose outputs nothing reads (repeated: chains of them)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        kept = [node for node in nodes if any(name in read for name in node.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def finish_graph(model: onnx.ModelProto, nodes: list, initializers: list) -> onnx.ModelProto:
    """`model` with `nodes` (in topological order: every pass here adds a Cast just before its
    reader or just after its writer) and `initializers` added; the nodes whose outputs nothing
    reads any more (a Cast back to float32 inside a float16 island) and the initializers no
    node reads (weights replaced by their float16 twins) dropped."""
    nodes = _drop_unread(nodes, {output.name for output in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    kept = [init for init in [*model.graph.initializer, *initializers] if init.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.value_info[:]
    return model


def lower_to_fp16(model: onnx.ModelProto, half_nodes: set) -> onnx.ModelProto:
    """The graph with `half_nodes` (node names) computing in float16."""
    model = _copy(model)
    types = tensor_types(model)
    initializers = {init.name: init for init in model.graph.initializer}
    half_twin, nodes, new_initializers = {}, [], []

    def half(name: str) -> str:
        if name not in half_twin:
            twin = name + HALF_SUFFIX
            if name in initializers:
                values = numpy_helper.to_array(initializers[name]).astype(np.float16)
                new_initializers.append(numpy_helper.from_array(values, twin))
            else:
                nodes.append(_cast(name, twin, TensorProto.FLOAT16, "lower"))
            half_twin[name] = twin
        return half_twin[name]

    for node in model.graph.node:
        if node.name in half_nodes and node.op_type != "Cast":
            skip = PARAMETER_INPUTS.get(node.op_type, set())
            for index, name in enumerate(node.input):
                if types.get(name) == TensorProto.FLOAT and index not in skip:
                    node.input[index] = half(name)
            for index, name in enumerate(node.output):
                if types.get(name) == TensorProto.FLOAT:
                    node.output[index] = half_twin[name] = name + HALF_SUFFIX
                    nodes.append(_cast(node.output[index], name, TensorProto.FLOAT, "lower"))
        nodes.append(node)
    return finish_graph(model, nodes, new_initializers)


def upcast_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph that rounds to float16 wherever `model` stores float16."""
    model = _copy(model)
    types = tensor_types(model)
    initializers = []
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            initializers.append(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
        else:
            initializers.append(init)
    del model.graph.initializer[:]
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for index, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT16:
                rounded = f"{name}/rounded"
                node.output[index] = rounded
                if node.op_type != "Cast":
                    nodes.append(_cast(rounded, f"{name}/half", TensorProto.FLOAT16, "upcast"))
                    rounded = f"{name}/half"
                nodes.append(_cast(rounded, name, TensorProto.FLOAT, "upcast"))
    return finish_graph(model, nodes, initializers)
