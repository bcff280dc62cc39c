"""How the network is computed, apart from what it computes.

By default the network runs in its bounded-memory formulation, exact up to float
reassociation: decoders folded per scale (see decoder.py), Noiseprint++ and the decoders in
row bands when band heights are set (see bands.py), attention in the backend's bounded form
(attention.py).
`official()` computes it as the official code does: explicit attention score matrices and
the decoders' 2048-channel concatenation; the benchmarks' reference.
"""

from contextlib import contextmanager

from .attention import attention_form

_settings = {"fold_decoders": True, "noiseprint_band_rows": None, "decoder_band_rows": None}


def decoders_folded() -> bool:
    return _settings["fold_decoders"]


def noiseprint_band_rows():
    """Rows of output per Noiseprint++ band, or None for the whole image at once."""
    return _settings["noiseprint_band_rows"]


def decoder_band_rows():
    """Rows of the 1/4 grid per decoder band, or None for the whole grid at once."""
    return _settings["decoder_band_rows"]


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
    # The "tensorrt" attention form is the official computation: MatMul -> Softmax -> MatMul.
    with attention_form("tensorrt"), _with(fold_decoders=False, noiseprint_band_rows=None,
                                           decoder_band_rows=None):
        yield


def in_bands(noiseprint_rows=None, decoder_rows=None):
    """Run Noiseprint++ `noiseprint_rows` output rows at a time and the (folded) decoders
    `decoder_rows` rows of the 1/4 grid at a time (None: all at once)."""
    return _with(noiseprint_band_rows=noiseprint_rows, decoder_band_rows=decoder_rows)
