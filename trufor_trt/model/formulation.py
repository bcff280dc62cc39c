"""How the network is computed, apart from what it computes.

By default the network runs in its bounded-memory formulation, exact up to float
reassociation: decoders folded per scale (see decoder.py), Noiseprint++ and the decoders in
row bands when band heights are set (see bands.py), attention in the backend's bounded form
(attention.py).
`for_onnxruntime()` is how the CPU graphs are traced: the same values, laid out for ONNX
Runtime's CPU kernels (layers.py, mit.py); the TensorRT graph is traced without it.
`official()` computes it as the official code does: explicit attention score matrices and
the decoders' 2048-channel concatenation; the benchmarks' reference.
"""

from contextlib import contextmanager

_settings = {"fold_decoders": True, "noiseprint_band_rows": None, "decoder_band_rows": None,
             "onnxruntime_layout": False}


def decoders_folded() -> bool:
    return _settings["fold_decoders"]


def noiseprint_band_rows():
    """Rows of output per Noiseprint++ band, or None for the whole image at once."""
    return _settings["noiseprint_band_rows"]


def decoder_band_rows():
    """Rows of the 1/4 grid whose decoder maps are computed at once (bands.decoder_groups), or
    None for the whole grid in the folded form."""
    return _settings["decoder_band_rows"]


def onnxruntime_layout() -> bool:
    """Trace for ONNX Runtime's CPU kernels: channels-last tokens, MixFFN on the grid."""
    return _settings["onnxruntime_layout"]


@contextmanager
def _with(**changes):
    previous = dict(_settings)
    _settings.update(changes)
    try:
        yield
    finally:
        _settings.update(previous)


@contextmanager
def official():
    from .attention import attention_form  # (attention -> layers -> this module)

    # The "tensorrt" attention form is the official computation: MatMul -> Softmax -> MatMul.
    with attention_form("tensorrt"), _with(fold_decoders=False, noiseprint_band_rows=None,
                                           decoder_band_rows=None):
        yield


def in_bands(noiseprint_rows=None, decoder_rows=None):
    """Run Noiseprint++ `noiseprint_rows` output rows at a time and the decoders as the CPU
    graphs do, `decoder_rows` rows of the 1/4 grid per group (None: all at once, folded)."""
    return _with(noiseprint_band_rows=noiseprint_rows, decoder_band_rows=decoder_rows)


def for_onnxruntime():
    return _with(onnxruntime_layout=True)
