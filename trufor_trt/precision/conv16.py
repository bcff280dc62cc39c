"""Convolutions lowered to float16 one at a time, in one of two forms (Noiseprint++'s layers).

Noiseprint++ amplifies rounding: on the seed-0 checkpoint some of its layers add a bias of
up to ~1500 to a product of about the same size (folded BatchNorm), so the float16 rounding
of that bias or of the layer's input moves Noiseprint++ by 0.1-0.5. Two forms fix what can be
fixed without leaving float16 arithmetic:

- "fp16": conv(x16, W16, b16) in float16, then the bias's rounding remainder b - b16 added
  in float32 (the float16 output stays as rounded as any float16 activation);
- "compensated": the input and the weights are each split into a float16 value and its
  float16 remainder (x = x_hi + x_lo, W = W_hi + W_lo, exact to about 2^-22), and one float16
  convolution over the channels [x_hi, x_lo, x_hi] with weights [W_hi, W_hi, W_lo] sums
  x_hi.W_hi + x_lo.W_hi + x_hi.W_lo in its float32 accumulator: three times the products of
  the layer, on tensor cores, with an error near float32's but for the output's float16 rounding
  (the 3xTF32 idea applied to float16), then the bias remainder in float32 as above.

Each lowered convolution reads float32 and hands float32 on (Casts at its borders), so the
forms combine freely with each other and with `lower_to_fp16` elsewhere.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fp16 import finish_graph

CONV_FORMS = ("fp16", "compensated")
COMPENSATED_TERMS = 3  # float16 products per product of the layer


def _half(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _remainder(values: np.ndarray) -> np.ndarray:
    """What float16 rounding left out of `values`, itself in float16."""
    return _half(values - _half(values).astype(np.float32))


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], to=to, name=target)


def _split_input(conv_name: str, x: str) -> tuple:
    """(nodes, name of [x_hi, x_lo, x_hi] in float16). x_hi and the round trip that measures
    the remainder are separate Casts, so each float16 tensor has one kind of reader."""
    hi, rounded, back = f"{conv_name}/x_hi", f"{conv_name}/x_rounded", f"{conv_name}/x_rounded_back"
    residual, lo, joined = f"{conv_name}/x_residual", f"{conv_name}/x_lo", f"{conv_name}/x_split"
    nodes = [_cast(x, hi, TensorProto.FLOAT16), _cast(x, rounded, TensorProto.FLOAT16),
             _cast(rounded, back, TensorProto.FLOAT),
             helper.make_node("Sub", [x, back], [residual], name=residual),
             _cast(residual, lo, TensorProto.FLOAT16),
             helper.make_node("Concat", [hi, lo, hi], [joined], axis=1, name=joined)]
    return nodes, joined


def _lower_one(node: onnx.NodeProto, form: str, initializers: dict) -> tuple:
    """(nodes replacing `node`, new initializers, names of the nodes computing in float16)."""
    if node.input[1] not in initializers or any(a.name == "group" and a.i != 1 for a in node.attribute):
        raise ValueError(f"{node.name}: only ungrouped convolutions with constant weights")
    name, x, output = node.name, node.input[0], node.output[0]
    weights = numpy_helper.to_array(initializers[node.input[1]])
    if form == "compensated":
        nodes, conv_input = _split_input(name, x)
        weights16 = np.concatenate([_half(weights), _half(weights), _remainder(weights)], axis=1)
    else:
        nodes, conv_input = [_cast(x, f"{name}/x_hi", TensorProto.FLOAT16)], f"{name}/x_hi"
        weights16 = _half(weights)
    new = [numpy_helper.from_array(weights16, f"{name}/w16")]
    inputs = [conv_input, f"{name}/w16"]
    bias = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        new.append(numpy_helper.from_array(_half(bias), f"{name}/b16"))
        inputs.append(f"{name}/b16")
    conv = helper.make_node("Conv", inputs, [f"{output}/conv16"], name=name)
    conv.attribute.extend(node.attribute)
    nodes.append(conv)
    remainder = None if bias is None else bias - _half(bias).astype(np.float32)
    if remainder is None or not remainder.any():
        nodes.append(_cast(f"{output}/conv16", output, TensorProto.FLOAT))
    else:
        # The bias's rounding is the same error at every pixel: added back in float32.
        new.append(numpy_helper.from_array(remainder.reshape(1, -1, 1, 1).astype(np.float32),
                                           f"{name}/b_remainder"))
        nodes += [_cast(f"{output}/conv16", f"{output}/conv16_fp32", TensorProto.FLOAT),
                  helper.make_node("Add", [f"{output}/conv16_fp32", f"{name}/b_remainder"], [output],
                                   name=f"{name}/b_remainder_add")]
    half = {name} | ({f"{name}/x_split"} if form == "compensated" else set())
    return nodes, new, half


def lower_convolutions(model: onnx.ModelProto, forms: dict) -> tuple:
    """(the graph with each Conv of `forms` (node name -> "fp16" | "compensated") lowered,
    names of the nodes that compute in float16)."""
    unknown = set(forms.values()) - set(CONV_FORMS)
    if unknown:
        raise ValueError(f"unknown convolution forms {sorted(unknown)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name: init for init in model.graph.initializer}
    nodes, new_initializers, half_nodes = [], [], set()
    for node in model.graph.node:
        if node.name in forms and node.op_type == "Conv":
            replaced, new, half = _lower_one(node, forms[node.name], initializers)
            nodes += replaced
            new_initializers += new
            half_nodes |= half
        else:
            nodes.append(node)
    return finish_graph(model, nodes, new_initializers), half_nodes


def conv_flop_factor(form: str) -> int:
    """Products executed per product of the layer."""
    return COMPENSATED_TERMS if form == "compensated" else 1
