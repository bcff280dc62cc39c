"""Noiseprint++'s convolutions in float16, centered: the form that holds in real float16 kernels.

Noiseprint++ amplifies rounding: on the seed-0 checkpoint (real Noiseprint++ weights) its
layers read ReLU outputs with large per-channel means, and the folded BatchNorm's bias (up to
~1500) cancels the product of those means. Stored as is in float16, the input and the large
pre-bias product are rounded at a spacing up to 1.0, and Noiseprint++ moves by 0.2-0.5.

The cancellation is a constant per channel, so it is taken out of the float16 tensors. With
`c` a per-input-channel center from calibration (a float16-exact value), exact algebra gives

    conv(x) + b = conv16(x - c) + [conv(c * ones) + b]

where `conv(c * ones)`, with the layer's own zero padding, is a one-channel convolution of an
all-ones image with the kernel K[o] = sum_i W[o, i] c_i: exact at the borders, 1/64 of the
layer's products, computed in float32 with the bias folded in. The float16 convolution then
reads small centered values and sums small products. The all-ones image takes its height and
width from the input at run time (Shape, ConstantOfShape), so any image size builds.

Two forms:
- "centered": the centered input rounded to float16 once;
- "centered_split": the centered input as hi + lo (lo = what rounding hi left out, itself in
  float16) and one float16 convolution over the channels [hi, lo] with weights [W, W]: twice the
  products, on tensor cores, and the input's rounding gone (what remains: the weights' and the
  output's). On the seed-0 checkpoint at 1536x2048 the layers after the first moved
  Noiseprint++ by 3.4e-3 centered (3 layers left out), 2.4e-3 split (none left out).

The lowered convolution reads float32 and hands float32 on (Casts at its borders), so it
combines with `lower_to_fp16` elsewhere.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trufor_trt.precision.fp16 import finish_graph
from trufor_trt.precision.weight_store import INLINE, copy_without_weights

CONV_FORMS = ("centered", "centered_split")
SPLIT_TERMS = 2  # float16 products per product of the layer in the split form


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], to=to, name=target)


def channel_centers(means: np.ndarray) -> np.ndarray:
    """Per-channel centers from measured means: the nearest float16 values, kept in float32."""
    return np.asarray(means, np.float32).astype(np.float16).astype(np.float32)


def _ones_like_image(conv_name: str, x: str) -> tuple:
    """(nodes, name of a 1 x 1 x H x W float32 image of ones with the H x W of `x`, initializers)."""
    shape, size, full, ones = (f"{conv_name}/{part}" for part in ("x_shape", "x_size", "ones_shape", "ones"))
    constants = {"two": [2], "four": [4], "one_one": [1, 1]}
    nodes = [helper.make_node("Shape", [x], [shape], name=shape),
             helper.make_node("Slice", [shape, f"{conv_name}/two", f"{conv_name}/four"], [size], name=size),
             helper.make_node("Concat", [f"{conv_name}/one_one", size], [full], axis=0, name=full),
             helper.make_node("ConstantOfShape", [full], [ones], name=ones,
                              value=numpy_helper.from_array(np.ones(1, np.float32)))]
    return nodes, ones, [numpy_helper.from_array(np.array(values, np.int64), f"{conv_name}/{name}")
                         for name, values in constants.items()]


def _split_centered(name: str) -> list:
    """Nodes writing `{name}/x_split`: the centered input as [hi, lo] in float16 along the
    channels, lo = the rounding remainder of hi. hi and the round trip that measures the
    remainder are separate Casts, so each float16 tensor has one kind of reader."""
    centered = f"{name}/x_centered"
    return [_cast(centered, f"{name}/x_hi", TensorProto.FLOAT16),
            _cast(centered, f"{name}/x_rounded", TensorProto.FLOAT16),
            _cast(f"{name}/x_rounded", f"{name}/x_rounded_back", TensorProto.FLOAT),
            helper.make_node("Sub", [centered, f"{name}/x_rounded_back"], [f"{name}/x_residual"],
                             name=f"{name}/x_residual"),
            _cast(f"{name}/x_residual", f"{name}/x_lo", TensorProto.FLOAT16),
            helper.make_node("Concat", [f"{name}/x_hi", f"{name}/x_lo"], [f"{name}/x_split"], axis=1,
                             name=f"{name}/x_split")]


def _lower_centered(node: onnx.NodeProto, weights: np.ndarray, bias, center: np.ndarray, split: bool,
                    store) -> tuple:
    """(nodes, initializers) computing `node`'s output as conv16(x - c) + conv(ones, K, b);
    `split`: the centered input as hi + lo, one float16 convolution over both."""
    name, x, output = node.name, node.input[0], node.output[0]
    offset_kernel = np.einsum("oikl,i->okl", weights.astype(np.float64), center.astype(np.float64))
    new = [store.tensor(center.reshape(1, -1, 1, 1).astype(np.float32), f"{name}/center"),
           store.tensor(np.concatenate([weights] * (SPLIT_TERMS if split else 1), axis=1).astype(np.float16),
                        f"{name}/w16"),
           store.tensor(offset_kernel[:, None].astype(np.float32), f"{name}/w_offset")]
    ones_nodes, ones, ones_initializers = _ones_like_image(name, x)
    offset_inputs = [ones, f"{name}/w_offset"]
    if bias is not None:
        new.append(store.tensor(bias.astype(np.float32), f"{name}/b"))
        offset_inputs.append(f"{name}/b")
    conv_input = f"{name}/x_split" if split else f"{name}/x_centered16"
    conv = helper.make_node("Conv", [conv_input, f"{name}/w16"], [f"{output}/conv16"], name=name)
    offset = helper.make_node("Conv", offset_inputs, [f"{output}/offset"], name=f"{name}/offset")
    for made in (conv, offset):
        made.attribute.extend(node.attribute)
    to_half = _split_centered(name) if split else [_cast(f"{name}/x_centered", f"{name}/x_centered16",
                                                         TensorProto.FLOAT16)]
    nodes = [helper.make_node("Sub", [x, f"{name}/center"], [f"{name}/x_centered"], name=f"{name}/x_centered"),
             *to_half, conv,
             _cast(f"{output}/conv16", f"{output}/conv16_fp32", TensorProto.FLOAT), *ones_nodes, offset,
             helper.make_node("Add", [f"{output}/conv16_fp32", f"{output}/offset"], [output],
                              name=f"{name}/offset_add")]
    return nodes, new + ones_initializers


def _lower_one(node: onnx.NodeProto, form: str, initializers: dict, center: np.ndarray, store) -> tuple:
    if node.input[1] not in initializers or any(a.name == "group" and a.i != 1 for a in node.attribute):
        raise ValueError(f"{node.name}: only ungrouped convolutions with constant weights")
    weights = store.array(initializers[node.input[1]])
    if center is None or center.shape != (weights.shape[1],):
        raise ValueError(f"{node.name}: needs one center per input channel ({weights.shape[1]})")
    has_bias = len(node.input) > 2 and node.input[2]
    bias = store.array(initializers[node.input[2]]) if has_bias else None
    return _lower_centered(node, weights, bias, center, form == "centered_split", store)


def lower_convolutions(model: onnx.ModelProto, forms: dict, centers: dict, store=INLINE) -> tuple:
    """(the graph with each Conv of `forms` (node name -> "centered") lowered around
    `centers` (node name -> one float32 center per input channel), names of the nodes that
    compute in float16). `store`: where its weights are held (precision/weight_store.py)."""
    unknown = set(forms.values()) - set(CONV_FORMS)
    if unknown:
        raise ValueError(f"unknown convolution forms {sorted(unknown)}")
    weights = list(model.graph.initializer)
    model = copy_without_weights(model)
    initializers = {init.name: init for init in weights}
    nodes, new_initializers, half_nodes = [], [], set()
    for node in model.graph.node:
        if node.name in forms and node.op_type == "Conv":
            center = centers.get(node.name)
            replaced, new = _lower_one(node, forms[node.name], initializers,
                                       None if center is None else np.asarray(center, np.float32), store)
            nodes += replaced
            new_initializers += new
            half_nodes |= {node.name, f"{node.name}/x_split"} if forms[node.name] == "centered_split" else {node.name}
        else:
            nodes.append(node)
    return finish_graph(model, nodes, weights + new_initializers), half_nodes
