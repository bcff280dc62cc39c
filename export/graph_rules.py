"""What makes an ONNX graph TensorRT-shaped, checked on the graph itself.

TensorRT builds every engine from our ONNX graph, so the graph must only use what the oldest
TensorRT we target parses: TensorRT 10.3 (JetPack 6). The operator list below is the ONNX-TensorRT
parser's support matrix (onnx-tensorrt docs/operators.md for 10.x), limited to operators a
vision network like ours could plausibly produce; the check refuses anything outside it.
"""

import onnx

# Supported by the TensorRT 10.3 ONNX parser (opsets 9..20).
TENSORRT_ONNX_OPERATORS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil",
    "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum",
    "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp",
    "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "HardSigmoid", "Identity", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpNormalization",
    "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu",
    "QuantizeLinear", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "Selu", "Shape", "Sigmoid", "Sign",
    "Sin", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})
# Control flow (a traced Python `assert` becomes If) and operators whose output shape depends
# on tensor values: they defeat TensorRT's shape planning, so our graph must have none.
DATA_DEPENDENT_OPERATORS = frozenset({"NonZero", "Unique", "If", "Loop", "Scan", "NonMaxSuppression",
                                      "Compress"})
# Reduce* whose axes must be inputs (opset >= 18) and, for TensorRT, constant initializers.
REDUCE_WITH_AXES_INPUT = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum",
                                    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                    "ReduceLogSumExp", "ReduceSumSquare"})
RESIZE_UNPARSED_ATTRIBUTES = frozenset({"antialias", "keep_aspect_ratio_policy"})
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"})


def operator_types(model: onnx.ModelProto) -> set:
    return {node.op_type for node in model.graph.node}


def _attribute(node, name, default=None):
    found = [onnx.helper.get_attribute_value(attr) for attr in node.attribute if attr.name == name]
    value = found[0] if found else default
    return value.decode() if isinstance(value, bytes) else value


# Inputs the TensorRT 10.3 parser reads as weights, by operator: (input index, its role, what it
# must be). "initializer": a graph initializer; "constant": an initializer or a Constant's output.
WEIGHT_INPUTS = {"Slice": (3, "axes", "initializer"), "Squeeze": (1, "axes", "initializer"),
                 "Pad": (3, "axes", "initializer"), "CumSum": (1, "axis", "initializer"),
                 "Unsqueeze": (1, "axes", "constant"),
                 **{op: (1, "axes", "constant") for op in REDUCE_WITH_AXES_INPUT}}


def _weight_input_problems(model: onnx.ModelProto) -> list:
    initializers = {tensor.name for tensor in model.graph.initializer}
    allowed = {"initializer": initializers,
               "constant": initializers | {output for node in model.graph.node
                                           if node.op_type == "Constant" for output in node.output}}
    problems = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_INPUTS:
            continue
        index, role, kind = WEIGHT_INPUTS[node.op_type]
        given = node.input[index] if len(node.input) > index else ""
        if given and given not in allowed[kind]:
            problems.append(f"{node.name}: {node.op_type} {role} is not a {kind}")
    return problems


def _resize_problems(model: onnx.ModelProto) -> list:
    problems = []
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        mode = _attribute(node, "mode", "nearest")
        coordinates = _attribute(node, "coordinate_transformation_mode", "half_pixel")
        if mode not in ("nearest", "linear") or coordinates not in RESIZE_COORDINATE_MODES:
            problems.append(f"{node.name}: Resize {mode}/{coordinates} is not parsed by TensorRT")
        # Opset 18's additions, which the 10.3 parser does not know: the graph must not carry them.
        problems += [f"{node.name}: Resize {attr.name} is not parsed by TensorRT 10.3"
                     for attr in node.attribute if attr.name in RESIZE_UNPARSED_ATTRIBUTES]
    return problems


def _image_axes(rank: int):
    """The axes of an input that follow the image's size: N, H, W of an NCHW image; the rows and
    columns of the decoder graphs' channels-last maps (rows x W x C); both of a matrix."""
    return {4: (0, 2, 3), 3: (0, 1)}.get(rank, range(rank))


def _symbolic_input_problems(model: onnx.ModelProto) -> list:
    problems = []
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        fixed = [index for index in _image_axes(len(dims)) if dims[index].HasField("dim_value")]
        if fixed:
            problems.append(f"input {graph_input.name}: dims {fixed} are fixed, not symbolic")
    return problems


def tensorrt_shape_problems(model: onnx.ModelProto) -> list:
    """Every reason this graph would not build as a dynamic-shape TensorRT engine ([] if none)."""
    ops = operator_types(model)
    problems = [f"operator {op} is not parsed by TensorRT 10.3"
                for op in sorted(ops - TENSORRT_ONNX_OPERATORS)]
    problems += [f"operator {op} is control flow or has data-dependent output shapes"
                 for op in sorted(ops & DATA_DEPENDENT_OPERATORS)]
    return problems + _weight_input_problems(model) + _resize_problems(model) + \
        _symbolic_input_problems(model)
