"""Graph variants that share one copy of their weights: large initializers held in memory once.

A precision plan builds and runs hundreds of variants of one ~270 MB graph. With the weights
inside each variant, every pass and every cut copied them and every ONNX Runtime session
serialized and parsed them again: seconds per trial, where the trial's own computation takes
a fraction of a second at 256 px. In a WeightStore's graphs a large initializer is a stub
(ONNX external data, no bytes) naming an array the store holds, and a session takes the
arrays themselves (`initializers`, for SessionOptions.add_external_initializers).

A stub names its array by content (a digest of dtype, shape and bytes) or by the stub it was
converted from, so equal weights have equal stubs: graphs still compare and hash as they would
with their bytes inside. InlineWeights is the same interface over ordinary graphs, the weights
inside: what the passes use when no store is given (the graphs written to a model folder).
"""

import hashlib

import google.protobuf.message
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STUB_PREFIX = "trufor-weight-store:"
INLINE_BYTES = 1 << 16  # smaller tensors (shapes, biases, centers) stay inside the graph


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        elif isinstance(value, google.protobuf.message.Message):
            getattr(target, field.name).CopyFrom(value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)


def copy_without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose graph has no initializers: a pass gives finish_graph the
    original's weights and keeps those its graph reads. A whole copy of the ~270 MB of weights
    (serialized and parsed) cost each pass of an FP16 trial half a second."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    return copy


class InlineWeights:
    """Weights inside the graph."""

    def array(self, tensor: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        return numpy_helper.from_array(array, name)

    def converted(self, tensor: TensorProto, dtype, name: str) -> TensorProto:
        """The initializer `tensor` as `dtype`, named `name`."""
        return numpy_helper.from_array(self.array(tensor).astype(dtype), name)

    def initializers(self, model: onnx.ModelProto) -> dict:
        """What an ONNX Runtime session of `model` is given besides its bytes: nothing here."""
        return {}


INLINE = InlineWeights()


def _key_of(tensor: TensorProto) -> str:
    """The store key a stub names ("" for a tensor with its bytes inside)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return ""
    location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
    return location[len(STUB_PREFIX):] if location.startswith(STUB_PREFIX) else ""


def _digest(array: np.ndarray) -> str:
    content = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    content.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return content.hexdigest()


class WeightStore(InlineWeights):
    """Arrays by key, and the graphs' stubs that name them."""

    def __init__(self):
        self._arrays, self._ort_values = {}, {}

    def _stub(self, key: str, array: np.ndarray, name: str) -> TensorProto:
        if key not in self._arrays:
            held = np.ascontiguousarray(array)
            held.flags.writeable = False  # shared by every graph that names it
            self._arrays[key] = held
        stub = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                           dims=array.shape, data_location=TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=STUB_PREFIX + key)
        stub.external_data.add(key="length", value=str(array.nbytes))
        return stub

    def array(self, tensor: TensorProto) -> np.ndarray:
        key = _key_of(tensor)
        return self._arrays[key] if key else numpy_helper.to_array(tensor)

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        return self._stub(_digest(array), array, name)

    def converted(self, tensor: TensorProto, dtype, name: str) -> TensorProto:
        key = _key_of(tensor)
        if not key:
            return super().converted(tensor, dtype, name)
        derived = f"{key}:{np.dtype(dtype).str}"
        array = self._arrays.get(derived)
        return self._stub(derived, self._arrays[key].astype(dtype) if array is None else array, name)

    def detach(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose large initializers are stubs (stubs it has are kept)."""
        light = copy_without_weights(model)
        light.graph.initializer.extend(
            tensor if _key_of(tensor) or tensor.ByteSize() < INLINE_BYTES
            else self.tensor(numpy_helper.to_array(tensor), tensor.name) for tensor in model.graph.initializer)
        return light

    def attach(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with every stub's bytes inside: a graph to write out."""
        whole = copy_without_weights(model)
        whole.graph.initializer.extend(numpy_helper.from_array(self.array(tensor), tensor.name)
                                       if _key_of(tensor) else tensor for tensor in model.graph.initializer)
        return whole

    def initializers(self, model: onnx.ModelProto) -> dict:
        """name -> OrtValue of each stub of `model`: what its ONNX Runtime session is given
        besides its bytes (create_session's `initializers`)."""
        return {tensor.name: self._ort_value(_key_of(tensor)) for tensor in model.graph.initializer
                if _key_of(tensor)}

    def _ort_value(self, key: str):
        import onnxruntime as ort

        if key not in self._ort_values:  # wraps the array, no copy: the store keeps both alive
            self._ort_values[key] = ort.OrtValue.ortvalue_from_numpy(self._arrays[key])
        return self._ort_values[key]

