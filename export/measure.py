"""How far a graph variant moves the published outputs from the FP32 graph, on the CPU."""

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import onnx

from trufor_trt.bands import noiseprint_row_bands
from trufor_trt.engine.onnxruntime_runner import create_session, run_noiseprint_band
from trufor_trt.engine.postprocess import decision_flipped, postprocess
from trufor_trt.engine.preprocess import size_label
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES, RawOutputs
from trufor_trt.export.chain_parts import cut_after_noiseprint, cut_from, with_outputs
from trufor_trt.precision.blocks import block_of, graph_links
from trufor_trt.precision.budgets import FP16_BUDGET
from trufor_trt.precision.kernel_models import KERNEL_MODELS
from trufor_trt.precision.row_chunks import attention_in_row_chunks, row_chunks_for
from trufor_trt.precision.weight_store import INLINE

OUTPUTS = ("map", "conf", "score", "np++")
NOISEPRINT_RUNS_KEPT = 8  # distinct Noiseprint++ parts whose outputs are kept
RUNS_KEPT = 2  # recent runs whose block outputs are kept (one per kernel model: a plan alternates them)
# Noiseprint++'s simulated FP16 forms hold several 64- and 128-channel full-resolution tensors
# at once: 6 GB more at 1536x2048 whole, a band's share of it in row bands (exact: bands.py).
NOISEPRINT_BAND_PIXELS = 2 ** 20


def create_session_from_model(model: onnx.ModelProto, store=INLINE):
    """A session of `model`, whose weights `store` holds (precision/weight_store.py)."""
    return create_session(model.SerializeToString(), initializers=store.initializers(model))


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


@dataclass
class _Run:
    """A run whose block outputs are kept: a later graph reads what it computes as this one did."""
    noiseprint: bytes  # the digest of its Noiseprint++ part
    rest: onnx.ModelProto  # its graph after Noiseprint++, uncut
    outputs: dict  # block output -> its value per input (float32 ones)


def cut_points(graph: onnx.ModelProto) -> set:
    """The block outputs a run may keep and a later run start from: not those a QuantizeLinear
    reads or a DequantizeLinear writes. ONNX Runtime fuses a quantized operator with its Q/DQ
    pairs, and an output taken or fed between them would change what it computes."""
    producer, readers = graph_links(graph)
    return {tensor for tensor in block_boundaries(graph) if producer[tensor].op_type != "DequantizeLinear"
            and not any(reader.op_type == "QuantizeLinear" for reader in readers.get(tensor, ()))}


class NetworkRuns:
    """Whole-network graphs (TensorRT-shaped, any precision) run on a fixed list of inputs,
    compared with a reference graph run on them first (`reference_outputs`).

    Most of a precision plan's trials change only what comes after Noiseprint++, which is 58%
    of a 256 px run and a third of a 1536x2048 one: each graph runs as two parts, Noiseprint++
    and the rest, and Noiseprint++'s outputs are kept per distinct Noiseprint++ part (by the
    SHA-256 of its serialized graph), so a trial that leaves it as it was runs only the rest.
    With `reuse_blocks`, the block outputs of the reference and of the last RUNS_KEPT runs are
    kept too, and a trial runs only what its changes reach: from the last block outputs it
    computes as one of those runs did (a decoder's trial runs the decoder; a plan's next
    candidate, a few units given back, runs from the first of them). Self-attention runs in
    row chunks where the inputs are large (precision/row_chunks.py)."""

    def __init__(self, inputs: list, reference: onnx.ModelProto, attention_chains=(), reuse_blocks=False,
                 store=INLINE):
        """`store`: where the graphs hold their weights (precision/weight_store.py)."""
        self.inputs, self.attention_chains, self.store = inputs, list(attention_chains), store
        self._noiseprint = {}  # digest -> Noiseprint++ output per input
        self._reuse_blocks, self._reference, self._recent = reuse_blocks, None, []
        parts = cut_after_noiseprint(reference)
        self.reference_outputs = self._run(parts["noiseprint"], parts["rest"])

    @staticmethod
    def _noiseprint_digest(part: onnx.ModelProto) -> bytes:
        return hashlib.sha256(part.SerializeToString()).digest()

    def _noiseprint_outputs(self, digest: bytes, part: onnx.ModelProto) -> list:
        if digest not in self._noiseprint:
            session = create_session_from_model(part, self.store)
            if len(self._noiseprint) >= NOISEPRINT_RUNS_KEPT:
                del self._noiseprint[next(iter(self._noiseprint))]
            self._noiseprint[digest] = [_in_row_bands(session, x) for x in self.inputs]
        return self._noiseprint[digest]

    def _part_to_run(self, rest: onnx.ModelProto, noiseprint_digest: bytes) -> tuple:
        """(what of `rest` must run, the kept run it reads block outputs from or None, the
        tensors `rest` computes as that run did): the kept run that leaves the least to run."""
        best = (rest, None, set())
        for kept in [self._reference, *self._recent] if self._reference else []:
            inputs = {INPUT_NAME} | ({OUTPUT_NAMES[2]} if noiseprint_digest == kept.noiseprint else set())
            unchanged = unchanged_tensors(rest, kept.rest, inputs)
            given = unchanged & set(kept.outputs)
            if given:
                part = cut_from(rest, given, {name: kept.outputs[name][0] for name in given})
                if len(part.graph.node) < len(best[0].graph.node):
                    best = (part, kept, unchanged)
        return best

    def _rest_session(self, rest: onnx.ModelProto):
        largest = max(self.inputs, key=lambda x: x.shape[2] * x.shape[3])
        attention_in_row_chunks(rest, self.attention_chains, row_chunks_for(*largest.shape[2:]))
        return create_session_from_model(rest, self.store)

    def _run(self, noiseprint_part: onnx.ModelProto, rest: onnx.ModelProto) -> list:
        """RawOutputs per input (with `reuse_blocks`, the run's block outputs kept)."""
        digest = self._noiseprint_digest(noiseprint_part)
        noiseprints = self._noiseprint_outputs(digest, noiseprint_part)
        part, source, unchanged = self._part_to_run(rest, digest)
        kept = {name: source.outputs[name] for name in unchanged & set(source.outputs)} if source else {}
        computed = cut_points(rest) - set(kept) if self._reuse_blocks else set()
        # A copy either way: row chunking rewrites the graph it runs, and `rest` is kept as it is.
        part = with_outputs(part, computed & {output for node in part.graph.node for output in node.output})
        session = self._rest_session(part)
        names = [output.name for output in session.get_outputs()]
        read = {value.name for value in session.get_inputs()}
        outputs = []
        for index, (prepared, noiseprint) in enumerate(zip(self.inputs, noiseprints)):
            feeds = {INPUT_NAME: prepared, OUTPUT_NAMES[2]: noiseprint,
                     **{name: values[index] for name, values in kept.items() if name in read}}
            values = dict(zip(names, session.run(names, {name: feeds[name] for name in read})))
            for name in computed & set(values):  # shapes are recomputed: a fed shape's length would be unknown
                if values[name].dtype == np.float32:
                    kept.setdefault(name, []).append(values[name])
            outputs.append(RawOutputs.from_batch_of_one(values[OUTPUT_NAMES[0]], values[OUTPUT_NAMES[1]], noiseprint))
        if self._reuse_blocks:
            self._keep(_Run(digest, rest, kept))
        return outputs

    def _keep(self, run: _Run) -> None:
        if self._reference is None:
            self._reference = run
        else:
            self._recent = [*self._recent, run][-RUNS_KEPT:]

    def raw_outputs(self, graph: onnx.ModelProto) -> list:
        """The graph's RawOutputs on each input."""
        parts = cut_after_noiseprint(graph)
        return self._run(parts["noiseprint"], parts["rest"])


def budget_share(errors: dict) -> float:
    """The largest fraction of its budget any measured output uses (a flipped decision: inf)."""
    if errors.get("flipped"):
        return float("inf")
    return max(errors[name] / FP16_BUDGET[name] for name in OUTPUTS if name in errors)


def under_kernel_models(measure_one, kernels=KERNEL_MODELS, stop_above: float = math.inf,
                        differ: bool = True, share=budget_share) -> dict:
    """The worst deviation over the kernel models, each model's own under "by_kernel_model".
    `measure_one(kernel)` -> deviation. Past `stop_above` of the budget the rest are not run:
    the candidate fails either way (`share`: errors -> the share of the budget they use).
    `differ` False: the simulated graphs are the same under every model (no float16
    convolution), measured once and recorded for each."""
    by_kernel = {}
    for kernel in kernels:
        by_kernel[kernel] = measure_one(kernel) if differ or not by_kernel else next(iter(by_kernel.values()))
        if share(by_kernel[kernel]) > stop_above:
            break
    worst = {name: max(errors[name] for errors in by_kernel.values()) for name in by_kernel[kernels[0]]}
    return {**worst, "by_kernel_model": by_kernel}


class KernelOrder:
    """The order a plan's trials measure the kernel models in: the one that used the most of
    the budget in the last trial that measured them all first. A candidate past its limit under
    the first is not measured under the others (under_kernel_models), so a failing full-size
    trial usually costs one run, not one per kernel model."""

    def __init__(self, kernels=KERNEL_MODELS):
        self.kernels = list(kernels)

    def note(self, by_kernel: dict, share) -> None:
        measured = sorted(by_kernel, key=lambda kernel: -share(by_kernel[kernel]))
        self.kernels = measured + [kernel for kernel in self.kernels if kernel not in by_kernel]


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


def unused_size_key(image: np.ndarray, record: dict) -> str:
    """The image's "HxW" as a key of `record` that no other image holds yet: a second image of
    one size is recorded beside the first ("1536x2048, image 2"), not over it."""
    size = size_label(image)
    key, count = size, 1
    while key in record:
        count += 1
        key = f"{size}, image {count}"
    return key
