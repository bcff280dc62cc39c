"""Mixed precision written into the ONNX graph itself (TensorRT 11 takes precision from there).

- `lower_to_fp16(graph, nodes)`: the chosen nodes read and write float16 tensors (their float
  weights converted, Casts at the borders); graph inputs and outputs stay float32. This is
  the graph TensorRT builds.
- `upcast_fp16(graph, kernel)`: runs any such graph on a CPU. ONNX Runtime's CPU provider has
  almost no float16 kernels, so every float16 tensor becomes float32 *rounded to float16* (a
  Cast to float16 and back after each node that wrote float16), and each float16 convolution
  rounds as the kernel model says (kernel_models.py): kernels differ, and a plan that holds for
  one only is no evidence. This proves the effect of storing every weight and activation of
  those nodes in float16 (rounding, and overflow to inf where a value leaves the float16 range)
  under each modelled kernel; what a GPU's own tactics do, only a run on the GPU shows.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trufor_trt.precision.blocks import graph_links
from trufor_trt.precision.kernel_models import ACCUMULATION_CHANNELS, KERNEL_MODELS, STRESS_MODEL
from trufor_trt.precision.weight_store import INLINE, copy_without_weights


# Float inputs that are parameters, not data: they keep their type (Resize's roi and scales).
PARAMETER_INPUTS = {"Resize": {1, 2}}
HALF_SUFFIX = "/fp16"


def tensor_types(model: onnx.ModelProto, weights=None) -> dict:
    """Element type of every tensor whose type shape inference can tell (`weights`: the
    graph's initializers, where `model` is a copy without them). Inferred on a copy whose
    initializers are stand-in inputs: types need no weights, and copying ~270 MB of them into
    the inference made each FP16 trial seconds slower."""
    graph = model.graph
    stand_ins = [helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                 for init in (graph.initializer if weights is None else weights)]
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
    reader or just after its writer) and `initializers` added (with a copy_without_weights,
    the original's weights and the new ones); the nodes whose outputs nothing reads any more
    (a Cast back to float32 inside a float16 island) and the initializers no node reads
    (weights replaced by their float16 twins) dropped."""
    nodes = _drop_unread(nodes, {output.name for output in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    kept = [init for init in [*model.graph.initializer, *initializers] if init.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.value_info[:]
    return model


def lower_to_fp16(model: onnx.ModelProto, half_nodes: set, store=INLINE) -> onnx.ModelProto:
    """The graph with `half_nodes` (node names) computing in float16 (`store`: where its
    weights are held, precision/weight_store.py)."""
    weights = list(model.graph.initializer)
    model = copy_without_weights(model)
    types = tensor_types(model, weights)
    initializers = {init.name: init for init in weights}
    half_twin, nodes, new_initializers = {}, [], []

    def half(name: str) -> str:
        if name not in half_twin:
            twin = name + HALF_SUFFIX
            if name in initializers:
                new_initializers.append(store.converted(initializers[name], np.float16, twin))
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
    return finish_graph(model, nodes, weights + new_initializers)


def _round16(source: str, target: str) -> list:
    """`target` = `source` (float32) rounded to float16, kept in float32."""
    return [_cast(source, f"{target}/half", TensorProto.FLOAT16, "upcast"),
            _cast(f"{target}/half", target, TensorProto.FLOAT, "upcast")]


def _read_in_float32(model: onnx.ModelProto, types: dict) -> set:
    """Names of the float16 Convs whose output only Casts to float32 read: a fused kernel
    hands its float32 accumulator to that float32 epilogue without storing float16."""
    _, readers = graph_links(model)
    return {conv.name for conv in model.graph.node
            if conv.op_type == "Conv" and types.get(conv.output[0]) == TensorProto.FLOAT16
            and readers.get(conv.output[0])
            and all(reader.op_type == "Cast" and types.get(reader.output[0]) == TensorProto.FLOAT
                    for reader in readers[conv.output[0]])}


def _conv_attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _partial_conv(node: onnx.NodeProto, weight: np.ndarray, first: int, last: int, part: str,
                  initializers: list, store) -> list:
    """Nodes computing into `part` the conv of input channels first..last-1 alone."""
    initializers += [store.tensor(np.ascontiguousarray(weight[:, first:last]), f"{part}/w"),
                     numpy_helper.from_array(np.array([first], np.int64), f"{part}/start"),
                     numpy_helper.from_array(np.array([last], np.int64), f"{part}/end"),
                     numpy_helper.from_array(np.array([1], np.int64), f"{part}/axis")]
    return [helper.make_node("Slice", [node.input[0], f"{part}/start", f"{part}/end", f"{part}/axis"],
                             [f"{part}/x"], name=f"{part}/x"),
            helper.make_node("Conv", [f"{part}/x", f"{part}/w"], [part], name=part, **_conv_attributes(node))]


def _accumulated_in_fp16(node: onnx.NodeProto, target: str, weights: dict, initializers: list, store) -> list:
    """An ungrouped Conv, without its bias, into `target` as float16 accumulation would sum it:
    a partial sum per ACCUMULATION_CHANNELS input channels, each and every running total rounded."""
    weight = store.array(weights[node.input[1]])
    nodes, total = [], ""
    for first in range(0, weight.shape[1], ACCUMULATION_CHANNELS):
        part = f"{target}/channels{first}"
        nodes += _partial_conv(node, weight, first, min(first + ACCUMULATION_CHANNELS, weight.shape[1]), part,
                               initializers, store)
        nodes += _round16(part, f"{part}/rounded")
        if total:
            nodes += [helper.make_node("Add", [total, f"{part}/rounded"], [f"{part}/total"], name=f"{part}/total")]
            nodes += _round16(f"{part}/total", f"{part}/total_rounded")
        total = f"{part}/total_rounded" if total else f"{part}/rounded"
    return nodes + [helper.make_node("Identity", [total], [target], name=f"{target}/identity")]


def _over_summed_halves(node: onnx.NodeProto, producer: dict, weights: dict, initializers: list, store) -> list:
    """conv16's split form, a Conv over Concat([hi, lo]) with weights [W, W], as [an Add of hi
    and lo, the Conv of their sum with W] (empty where `node` is not that form): the same sum of
    products, half of them. hi + lo is exact in float32 (two 11-bit halves of one value, the
    second below the first's last bit); only the products' float32 rounding differs, 2^-24 of
    each. Under float16 accumulation the channels' partial sums differ: not used there."""
    concat = producer.get(node.input[0])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 \
            or _conv_attributes(concat).get("axis") != 1 or node.input[1] not in weights:
        return []
    weight = store.array(weights[node.input[1]])
    channels = weight.shape[1] // 2
    if weight.shape[1] % 2 or not np.array_equal(weight[:, :channels], weight[:, channels:]):
        return []
    summed, halved = f"{node.name}/hi_plus_lo", f"{node.input[1]}/one_half"
    initializers.append(store.tensor(np.ascontiguousarray(weight[:, :channels]), halved))
    conv = onnx.NodeProto()
    conv.CopyFrom(node)
    conv.input[0], conv.input[1] = summed, halved
    return [helper.make_node("Add", list(concat.input), [summed], name=summed), conv]


def _simulated_conv(node: onnx.NodeProto, kernel: str, into_float32: bool, weights: dict,
                    initializers: list, store) -> list:
    """A float16 Conv in float32 on its (already rounded) inputs, rounded as `kernel` rounds."""
    output, has_bias = node.output[0], len(node.input) > 2 and bool(node.input[2])
    if kernel == "fused":
        if into_float32:
            return [node]
        return [_renamed(node, f"{output}/sum"), *_round16(f"{output}/sum", output)]
    grouped = _conv_attributes(node).get("group", 1) != 1
    if kernel == "fp16_accumulation" and not grouped and weights[node.input[1]].dims[1] > ACCUMULATION_CHANNELS:
        nodes = _accumulated_in_fp16(node, f"{output}/product", weights, initializers, store)
    else:
        bare = helper.make_node("Conv", list(node.input[:2]), [f"{output}/product"], name=node.name,
                                **_conv_attributes(node))
        nodes = [bare]
    nodes += _round16(f"{output}/product", output if not has_bias else f"{output}/product_rounded")
    if has_bias:
        # cuDNN's order (PyTorch): the product is written in float16, then the bias added.
        column = f"{node.name}/bias_column"
        bias = store.array(weights[node.input[2]])
        initializers.append(store.tensor(bias.reshape(1, -1, 1, 1), column))
        nodes += [helper.make_node("Add", [f"{output}/product_rounded", column], [f"{output}/biased"],
                                   name=f"{output}/biased"), *_round16(f"{output}/biased", output)]
    return nodes


def _renamed(node: onnx.NodeProto, output: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[0] = output
    return copy


def upcast_fp16(model: onnx.ModelProto, kernel: str = "fused", store=INLINE) -> onnx.ModelProto:
    """A float32 graph that rounds to float16 wherever `model` stores float16, its float16
    convolutions rounding as the `kernel` model says (KERNEL_MODELS, STRESS_MODEL); `store`:
    where its weights are held (precision/weight_store.py)."""
    if kernel not in (*KERNEL_MODELS, STRESS_MODEL):
        raise ValueError(f"unknown kernel model {kernel!r}")
    initializers = [store.converted(init, np.float32, init.name) if init.data_type == TensorProto.FLOAT16 else init
                    for init in model.graph.initializer]
    types = tensor_types(model)
    model = copy_without_weights(model)
    # By name, converted only where read: converting every weight on each trial costs seconds.
    weights = {init.name: init for init in initializers}
    into_float32 = _read_in_float32(model, types)
    producer, _ = graph_links(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Conv" and types.get(node.output[0]) == TensorProto.FLOAT16:
            halves = _over_summed_halves(node, producer, weights, initializers, store) \
                if kernel != STRESS_MODEL else []
            nodes += [*halves[:-1], *_simulated_conv(halves[-1] if halves else node, kernel,
                                                     node.name in into_float32, weights, initializers, store)]
            continue
        nodes.append(node)
        for index, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT16:
                node.output[index] = f"{name}/rounded"
                if node.op_type == "Cast":
                    nodes.append(_cast(f"{name}/rounded", name, TensorProto.FLOAT, "upcast"))
                else:
                    nodes += _round16(f"{name}/rounded", name)
    return finish_graph(model, nodes, initializers)
