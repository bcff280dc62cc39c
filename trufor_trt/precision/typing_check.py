"""The checks a reduced-precision graph passes before it is written: a strongly typed TensorRT
build computes each node in the type of its inputs, so the graph's types must say exactly what
the plan decided, and nothing else.

- the graph's inputs and outputs are float32;
- every node's float inputs share one type (strong typing refuses a mixed node; ONNX too);
- the nodes that compute in float16 are exactly the planned ones;
- every Cast between float16 and float32 stands at a border of the plan: into float16 only
  where all its readers are planned nodes, back to float32 only after a planned node; the one
  exception is a round trip (float32 -> float16 -> float32, nothing else reading the float16),
  which computes nothing in float16: it measures a rounding (precision/conv16.py).
"""

import onnx
from onnx import TensorProto

from trufor_trt.precision.blocks import graph_links
from trufor_trt.precision.fp16 import PARAMETER_INPUTS, tensor_types

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                         TensorProto.DOUBLE})
TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
              TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}


def _float_input_types(node: onnx.NodeProto, types: dict) -> set:
    skip = PARAMETER_INPUTS.get(node.op_type, set())
    return {types[name] for index, name in enumerate(node.input)
            if name and index not in skip and types.get(name) in FLOAT_TYPES}


def _io_problems(model: onnx.ModelProto) -> list:
    return [f"graph {kind} {value.name} is {TYPE_NAMES.get(value.type.tensor_type.elem_type, 'not float')}, "
            "not float32"
            for kind, values in (("input", model.graph.input), ("output", model.graph.output))
            for value in values if value.type.tensor_type.elem_type != TensorProto.FLOAT]


def _is_cast_to(node, to: int, types: dict) -> bool:
    return node is not None and node.op_type == "Cast" and types.get(node.output[0]) == to


def _round_trips(model: onnx.ModelProto, types: dict) -> set:
    """Names of the Casts of float16 round trips: float32 -> float16 read only by Casts back."""
    _, readers = graph_links(model)
    trips = set()
    for cast in model.graph.node:
        if _is_cast_to(cast, TensorProto.FLOAT16, types) and types.get(cast.input[0]) == TensorProto.FLOAT:
            back = readers.get(cast.output[0], [])
            if back and all(_is_cast_to(node, TensorProto.FLOAT, types) for node in back):
                trips |= {cast.name, *(node.name for node in back)}
    return trips


def _cast_border_problems(model: onnx.ModelProto, types: dict, half: set) -> list:
    producer, readers = graph_links(model)
    trips = _round_trips(model, types)
    problems = []
    for cast in (node for node in model.graph.node if node.op_type == "Cast" and node.name not in trips):
        source, target = types.get(cast.input[0]), types.get(cast.output[0])
        if target == TensorProto.FLOAT16 and source in FLOAT_TYPES:
            outside = [node.name for node in readers.get(cast.output[0], []) if node.name not in half]
            if outside:
                problems.append(f"Cast {cast.name} feeds float16 to unplanned node(s) {', '.join(outside[:3])}")
        elif target == TensorProto.FLOAT and source == TensorProto.FLOAT16:
            origin = producer.get(cast.input[0])
            if origin is None or origin.name not in half:
                problems.append(f"Cast {cast.name} reads float16 that no planned node wrote")
    return problems


def precision_problems(model: onnx.ModelProto, planned_half: set) -> list:
    """Every way the graph's types differ from the plan ([] if none). `planned_half`: names of
    the nodes the plan put in float16."""
    types = tensor_types(model)
    problems = _io_problems(model)
    computes_half = set()
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        kinds = _float_input_types(node, types)
        if len(kinds) > 1:
            problems.append(f"node {node.name} ({node.op_type}) mixes "
                            f"{' and '.join(sorted(TYPE_NAMES.get(kind, str(kind)) for kind in kinds))} inputs")
        elif kinds == {TensorProto.FLOAT16}:
            computes_half.add(node.name)
        elif kinds and node.name in planned_half:
            problems.append(f"node {node.name} ({node.op_type}) is planned float16 but computes in "
                            f"{TYPE_NAMES.get(next(iter(kinds)), 'another type')}")
    problems += [f"node {name} computes in float16 but the plan keeps it float32"
                 for name in sorted(computes_half - set(planned_half))]
    return problems + _cast_border_problems(model, types, computes_half & set(planned_half))
