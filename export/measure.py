"""How far a graph variant moves the published outputs from the FP32 graph, on the CPU."""

import hashlib

import numpy as np
import onnx

from trufor_trt.bands import noiseprint_row_bands
from trufor_trt.engine.onnxruntime_runner import create_session, run_noiseprint_band
from trufor_trt.engine.postprocess import decision_flipped, postprocess
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs
from trufor_trt.export.chain_parts import cut_after_noiseprint, cut_from, with_outputs
from trufor_trt.precision.blocks import block_of, graph_links
from trufor_trt.precision.row_chunks import attention_in_row_chunks, row_chunks_for

OUTPUTS = ("map", "conf", "score", "np++")
NOISEPRINT_RUNS_KEPT = 8  # distinct Noiseprint++ parts whose outputs are kept
# Noiseprint++'s simulated FP16 forms hold several 64- and 128-channel full-resolution tensors
# at once: 6 GB more at 1536x2048 whole, a band's share of it in row bands (exact: bands.py).
NOISEPRINT_BAND_PIXELS = 2 ** 20


def create_session_from_model(model: onnx.ModelProto):
    return create_session(model.SerializeToString())


def _in_row_bands(session, prepared: np.ndarray) -> np.ndarray:
    """A Noiseprint++ graph's output on `prepared`, computed in exact row bands."""
    height, width = prepared.shape[2:]
    noiseprint = np.empty((1, 1, height, width), np.float32)
    for band in noiseprint_row_bands(height, max(1, NOISEPRINT_BAND_PIXELS // width)):
        run_noiseprint_band(session, prepared, noiseprint, *band)
    return noiseprint


def block_boundaries(graph: onnx.ModelProto) -> set:
    """The tensors one block writes and another reads (precision/blocks.py's blocks)."""
    producer, readers = graph_links(graph)
    return {tensor for tensor, node in producer.items() if node.op_type != "Constant"
            and any(block_of(reader.name) != block_of(node.name) for reader in readers.get(tensor, ()))}


def unchanged_tensors(candidate: onnx.ModelProto, reference: onnx.ModelProto, inputs: set) -> set:
    """The tensors `candidate` computes exactly as `reference` does: written by an equal node
    from unchanged tensors (`inputs`, weights equal to the reference's, unchanged outputs).
    Both are graphs cut by chain_parts (their nodes in an order that computes them)."""
    written_by = {output: node for node in reference.graph.node for output in node.output}
    weights = {tensor.name: tensor for tensor in reference.graph.initializer}
    unchanged = set(inputs) | {tensor.name for tensor in candidate.graph.initializer
                               if tensor.name in weights and tensor == weights[tensor.name]}
    for node in candidate.graph.node:
        same = written_by.get(node.output[0]) if node.output else None
        if same is not None and node == same and all(not tensor or tensor in unchanged for tensor in node.input):
            unchanged.update(node.output)
    return unchanged


class NetworkRuns:
    """Whole-network graphs (TensorRT-shaped, any precision) run on a fixed list of inputs,
    compared with a reference graph run on them first (`reference_outputs`).

    Most of a precision plan's trials change only what comes after Noiseprint++, which is 58%
    of a 256 px run and a third of a 1536x2048 one: each graph runs as two parts, Noiseprint++
    and the rest, and Noiseprint++'s outputs are kept per distinct Noiseprint++ part (by the
    SHA-256 of its serialized graph), so a trial that leaves it as it was runs only the rest.
    With `reuse_blocks`, the reference's block outputs are kept too, and a trial runs only what
    its changes reach: from the last block outputs it computes as the reference does (a
    decoder's trial runs the decoder). Self-attention runs in row chunks where the inputs are
    large (precision/row_chunks.py)."""

    def __init__(self, inputs: list, reference: onnx.ModelProto, attention_chains=(), reuse_blocks=False):
        self.inputs, self.attention_chains = inputs, list(attention_chains)
        self._noiseprint = {}  # digest -> Noiseprint++ output per input
        self._block_outputs = {}  # tensor -> the reference's value per input
        parts = cut_after_noiseprint(reference)
        self._reference_rest = parts["rest"] if reuse_blocks else None
        self._reference_noiseprint = self._noiseprint_digest(parts["noiseprint"])[0]
        kept = block_boundaries(parts["rest"]) if reuse_blocks else set()
        self.reference_outputs = self._run(parts["noiseprint"], parts["rest"], kept)

    @staticmethod
    def _noiseprint_digest(part: onnx.ModelProto) -> tuple:
        serialized = part.SerializeToString()
        return hashlib.sha256(serialized).digest(), serialized

    def _noiseprint_outputs(self, digest: bytes, serialized: bytes) -> list:
        if digest not in self._noiseprint:
            session = create_session(serialized)
            if len(self._noiseprint) >= NOISEPRINT_RUNS_KEPT:
                del self._noiseprint[next(iter(self._noiseprint))]
            self._noiseprint[digest] = [_in_row_bands(session, x) for x in self.inputs]
        return self._noiseprint[digest]

    def _changed_part(self, rest: onnx.ModelProto, noiseprint_digest: bytes) -> onnx.ModelProto:
        """What of `rest` must run: from the kept block outputs it computes unchanged."""
        unchanged_inputs = {INPUT_NAME} | ({OUTPUT_NAMES[2]} if noiseprint_digest == self._reference_noiseprint
                                           else set())
        given = unchanged_tensors(rest, self._reference_rest, unchanged_inputs) & set(self._block_outputs)
        if not given:
            return rest
        return cut_from(rest, given, {name: self._block_outputs[name][0] for name in given})

    def _rest_session(self, rest: onnx.ModelProto):
        largest = max(self.inputs, key=lambda x: x.shape[2] * x.shape[3])
        attention_in_row_chunks(rest, self.attention_chains, row_chunks_for(*largest.shape[2:]))
        return create_session(rest.SerializeToString())

    def _run(self, noiseprint_part: onnx.ModelProto, rest: onnx.ModelProto, keep=frozenset()) -> list:
        """RawOutputs per input; the values of `keep` (tensors of `rest`) kept as block outputs."""
        digest, serialized = self._noiseprint_digest(noiseprint_part)
        noiseprints = self._noiseprint_outputs(digest, serialized)
        if keep:
            rest = with_outputs(rest, keep)
        elif self._block_outputs:
            rest = self._changed_part(rest, digest)
        session = self._rest_session(rest)
        names = [output.name for output in session.get_outputs()]
        read = {value.name for value in session.get_inputs()}
        outputs = []
        for index, (prepared, noiseprint) in enumerate(zip(self.inputs, noiseprints)):
            feeds = {INPUT_NAME: prepared, OUTPUT_NAMES[2]: noiseprint,
                     **{name: kept[index] for name, kept in self._block_outputs.items() if name in read}}
            values = dict(zip(names, session.run(names, {name: feeds[name] for name in read})))
            for name in keep:  # shapes are recomputed: a fed shape's length would be unknown
                if values[name].dtype == np.float32:
                    self._block_outputs.setdefault(name, []).append(values[name])
            outputs.append(RawOutputs.from_batch_of_one(values[OUTPUT_NAMES[0]], values[OUTPUT_NAMES[1]], noiseprint))
        return outputs

    def raw_outputs(self, graph: onnx.ModelProto) -> list:
        """The graph's RawOutputs on each input."""
        parts = cut_after_noiseprint(graph)
        return self._run(parts["noiseprint"], parts["rest"])


def reference_analyses(runs: NetworkRuns, head) -> list:
    return [postprocess(raw, head) for raw in runs.reference_outputs]


def output_errors(ours, truth) -> dict:
    """Max abs change of each published output of one image (inf where non-finite)."""
    pairs = {"map": (ours.localization_map, truth.localization_map),
             "conf": (ours.confidence_map, truth.confidence_map),
             "score": (ours.score, truth.score),
             "np++": (ours.noiseprint, truth.noiseprint)}
    errors = {}
    for name, (left, right) in pairs.items():
        error = float(np.max(np.abs(np.asarray(left, np.float64) - np.asarray(right, np.float64))))
        errors[name] = error if np.isfinite(error) else float("inf")
    return errors


def worst_by_output(by_size: dict) -> dict:
    """The worst deviation of each output over several measurements (e.g. one per size)."""
    return {name: max(errors[name] for errors in by_size.values()) for name in OUTPUTS} if by_size else {}


def deviation(candidate: onnx.ModelProto, reference: list, runs: NetworkRuns, head) -> dict:
    """Worst change of each output over the runs' inputs, against the reference analyses, and
    how many decisions flipped (`flipped`)."""
    worst = {**dict.fromkeys(OUTPUTS, 0.0), "flipped": 0}
    for raw, truth in zip(runs.raw_outputs(candidate), reference):
        ours = postprocess(raw, head)
        for name, error in output_errors(ours, truth).items():
            worst[name] = max(worst[name], error)
        worst["flipped"] += decision_flipped(ours.score, truth.score)
    return worst
