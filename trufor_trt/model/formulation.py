"""How the network is computed, apart from what it computes: one immutable value per run.

A `Formulation` is passed into `TruFor.forward` (and on to every module that reads it); no
module keeps a setting of its own, so two threads may run one network in two formulations.

- `BOUNDED` (the default): bounded memory, exact up to float reassociation: decoders folded
  per scale (decoder.py), attention in PyTorch's flash-style kernel (attention.py).
- `in_bands(...)`: the same with Noiseprint++ and the decoders in row bands (bands.py).
- `traced_for(attention)`: how the graphs are traced: the TensorRT graph with the explicit
  attention pattern its fusion recognises, the CPU graphs with ONNX Runtime's attention node
  and a layout for its CPU kernels (layers.py, mit.py).
- `OFFICIAL`: as the official code computes it: explicit attention score matrices and the
  decoders' 2048-channel concatenation; the benchmarks' reference.
"""

from dataclasses import dataclass, replace

# eager: PyTorch's scaled_dot_product_attention; tensorrt: Mul -> MatMul -> Softmax -> MatMul;
# onnxruntime: one com.microsoft.MultiHeadAttention node (attention.py).
ATTENTION_FORMS = ("eager", "tensorrt", "onnxruntime")


@dataclass(frozen=True)
class Formulation:
    attention: str = "eager"
    fold_decoders: bool = True
    noiseprint_band_rows: int | None = None  # output rows per Noiseprint++ band; None: whole
    decoder_band_rows: int | None = None  # 1/4-grid rows per decoder group; None: whole, folded
    onnxruntime_layout: bool = False  # channels-last tokens, MixFFN on the grid

    def __post_init__(self):
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"unknown attention form {self.attention!r}")


BOUNDED = Formulation()
OFFICIAL = Formulation(attention="tensorrt", fold_decoders=False)


def in_bands(noiseprint_rows: int | None = None, decoder_rows: int | None = None) -> Formulation:
    """Noiseprint++ `noiseprint_rows` output rows at a time, the decoders as the CPU graphs run
    them, `decoder_rows` rows of the 1/4 grid per group (None: all at once, folded)."""
    return replace(BOUNDED, noiseprint_band_rows=noiseprint_rows, decoder_band_rows=decoder_rows)


def traced_for(attention: str) -> Formulation:
    """The formulation a graph with this attention form is traced in."""
    return Formulation(attention=attention, onnxruntime_layout=attention == "onnxruntime")
