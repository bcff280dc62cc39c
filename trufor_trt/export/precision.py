"""Mixed precision written into the ONNX graph itself (TensorRT 11 takes precision from there).

One pass, two outputs, from an FP32 graph and the set of nodes chosen to run in FP16:
- `lower_to_fp16`: those nodes read and write float16 tensors (weights converted, Casts at the
  borders); graph inputs and outputs stay float32. This is the graph TensorRT builds.
- `simulate_fp16`: the same nodes compute in float32 on inputs rounded to float16, and their
  outputs are rounded to float16 (Cast to float16 and back). ONNX Runtime's CPU provider has
  almost no float16 kernels, so this is how an FP16 variant is measured on a CPU. It proves
  the effect of storing every weight and every activation of those nodes in float16 (rounding,
  and overflow to inf when a value leaves the float16 range); it does not prove the effect of
  float16 arithmetic inside a kernel (TensorRT accumulates most convolutions and matrix
  products in float32, but its fused kernels and tactics are its own).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Float inputs that are parameters, not data: they keep their type (Resize's roi and scales).
PARAMETER_INPUTS = {"Resize": {1, 2}}
LOW = "fp16"


def _float_tensors(model: onnx.ModelProto) -> set:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = [*graph.value_info, *graph.input, *graph.output]
    floats = {info.name for info in infos if info.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}


class _Lowering:
    """Rewrites the chosen nodes' float inputs and outputs; `simulate` picks the flavour."""

    def __init__(self, model: onnx.ModelProto, simulate: bool):
        self.model = model
        self.simulate = simulate
        self.floats = _float_tensors(model)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.low_names = {}  # float32 tensor -> its float16 (or rounded) twin
        self.new_nodes = []
        self.new_initializers = []

    def _cast(self, source: str, target: str, to: int) -> None:
        self.new_nodes.append(helper.make_node("Cast", [source], [target], to=to,
                                               name=f"{target}/Cast"))

    def _round_trip(self, source: str, target: str) -> None:
        middle = f"{target}/half"
        self._cast(source, middle, TensorProto.FLOAT16)
        self._cast(middle, target, TensorProto.FLOAT)

    def low(self, name: str) -> str:
        """The float16 twin of a float32 tensor (created once)."""
        if name not in self.low_names:
            twin = f"{name}/{LOW}"
            if name in self.initializers:
                values = numpy_helper.to_array(self.initializers[name]).astype(np.float16)
                stored = values.astype(np.float32) if self.simulate else values
                self.new_initializers.append(numpy_helper.from_array(stored, twin))
            elif self.simulate:
                self._round_trip(name, twin)
            else:
                self._cast(name, twin, TensorProto.FLOAT16)
            self.low_names[name] = twin
        return self.low_names[name]

    def lower_node(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Cast":
            raise ValueError(f"{node.name}: Cast nodes are not lowered")
        parameters = PARAMETER_INPUTS.get(node.op_type, set())
        for index, name in enumerate(node.input):
            if name in self.floats and index not in parameters:
                node.input[index] = self.low(name)
        for index, name in enumerate(node.output):
            if name not in self.floats:
                continue
            if self.simulate:  # the node computes in float32; its result is rounded
                node.output[index] = f"{name}/raw"
                self._round_trip(node.output[index], name)
                self.low_names[name] = name
            else:  # the node writes float16; float32 consumers read a Cast of it
                node.output[index] = f"{name}/{LOW}"
                self._cast(node.output[index], name, TensorProto.FLOAT)
                self.low_names[name] = node.output[index]


def _lower(model: onnx.ModelProto, low_nodes: set, simulate: bool) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    model = onnx.ModelProto.FromString(model.SerializeToString())
    lowering = _Lowering(model, simulate)
    rewritten = []
    for node in model.graph.node:
        lowering.new_nodes = []
        if node.name in low_nodes:
            lowering.lower_node(node)
        rewritten += [*lowering.new_nodes, node]
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    model.graph.initializer.extend(lowering.new_initializers)
    del model.graph.value_info[:]
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    lowered = gs.export_onnx(graph)
    lowered.ir_version = model.ir_version
    return lowered


def lower_to_fp16(model: onnx.ModelProto, low_nodes: set) -> onnx.ModelProto:
    """The FP16-typed graph for TensorRT."""
    return _lower(model, low_nodes, simulate=False)


def simulate_fp16(model: onnx.ModelProto, low_nodes: set) -> onnx.ModelProto:
    """An FP32 graph that rounds the chosen nodes' inputs and outputs to float16."""
    return _lower(model, low_nodes, simulate=True)
