"""What made an output, recorded with it, so that a resumed batch reuses an output only when
the same input went through the same model, backend, precision and project version.

Each .npz carries it as one extra key (PROVENANCE_KEY, a JSON string) beside the official ones,
which stay exactly as the official test script writes them; results.jsonl carries it too.
"""

import hashlib
import json

import numpy as np

from .. import __version__
from ..engine.model_dir import sha256_file

PROVENANCE_KEY = "trufor_trt_provenance"
# What differs, in the order it is reported, with the reason a redone record gives.
REDO_REASONS = (("input_sha256", "redone: input changed"),
                ("model_sha256", "redone: made by another model"),
                ("backend", "redone: made by another backend"),
                ("precision", "redone: made at another precision"),
                ("trufor_trt", "redone: made by another trufor-trt version"))


def input_sha256(path, data=None):
    """The SHA-256 of `data` if given (an upload), else of the file; None where the file cannot be
    read (the decoder then says why)."""
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    try:
        return sha256_file(path)
    except OSError:
        return None


def provenance(input_sha256, runner) -> dict:
    return {"input_sha256": input_sha256, "model_sha256": runner.model_sha256,
            "backend": runner.backend, "precision": runner.precision, "trufor_trt": __version__}


def provenance_array(record: dict) -> np.ndarray:
    return np.array(json.dumps(record, sort_keys=True))


def read_saved(npz_path):
    """(provenance or None, score, (height, width)) of an existing output, or None if unreadable."""
    try:
        with np.load(npz_path, allow_pickle=False) as saved:
            found = json.loads(str(saved[PROVENANCE_KEY])) if PROVENANCE_KEY in saved.files else None
            return found, float(saved["score"]), tuple(int(side) for side in saved["imgsize"])
    except (OSError, ValueError, KeyError):
        return None


def why_redo(found, wanted: dict):
    """Why outputs made as `found` says cannot stand for `wanted` (None if they can)."""
    if found is None:
        return "redone: the outputs carry no provenance"
    for key, reason in REDO_REASONS:
        if found.get(key) != wanted[key]:
            return reason
    return None
