"""What made an output, recorded with it, so that a resumed batch reuses an output only when
the same input went through the same model, backend, precision and project version.

Each .npz carries it as one extra key (PROVENANCE_KEY, a JSON string) beside the official ones,
which stay exactly as the official test script writes them; results.jsonl carries it too.
`official` says whether the checkpoint is the TruFor authors' published trufor.pth.tar: its
SHA-256 is the one OFFICIAL_CHECKPOINT_SHA256 names (with a model folder, the checkpoint its
manifest records, whose files are all checked against their hashes when the folder opens; the
model files' own SHA-256 is recorded beside it).
"""

import json
from typing import Optional

import numpy as np

from trufor_trt import __version__
from trufor_trt.engine.decode import DEFAULT_MAX_FILE, open_regular
from trufor_trt.errors import ImageError
from trufor_trt.files import sha256_stream

PROVENANCE_KEY = "trufor_trt_provenance"
# trufor.pth.tar from the TruFor authors' TruFor_weights.zip.
OFFICIAL_CHECKPOINT_SHA256 = "ac1d90e329a72e0d66e8665e123a19e94bfae3209c3ef8a4f9ca3b91578c7844"
# What differs, in the order it is reported, with the reason a redone record gives.
REDO_REASONS = (("input_sha256", "redone: input changed"),
                ("model_sha256", "redone: made by another model"),
                ("backend", "redone: made by another backend"),
                ("precision", "redone: made at another precision"),
                ("model_files_sha256", "redone: made from other model files"),
                ("trufor_trt", "redone: made by another trufor-trt version"))


def input_sha256(path, max_bytes: int = DEFAULT_MAX_FILE):
    """The SHA-256 of the file; None where it is not one the decoder would read (not a regular
    file, over `max_bytes`, unreadable: it then says why)."""
    try:
        with open_regular(path, max_bytes) as handle:
            return sha256_stream(handle)
    except (ImageError, OSError):
        return None


def is_official(model_sha256: Optional[str]) -> bool:
    return model_sha256 == OFFICIAL_CHECKPOINT_SHA256


def not_official_warning(model_sha256: Optional[str]) -> Optional[str]:
    """The line an analyst must see when the model is not the published TruFor (None if it is)."""
    if is_official(model_sha256):
        return None
    return (f"warning: checkpoint {str(model_sha256)[:12]}... is not the official trufor.pth.tar: "
            "these results are not the published TruFor's (provenance: official false)")


def provenance(input_sha256, runner) -> dict:
    return {"input_sha256": input_sha256, "model_sha256": runner.model_sha256,
            "official": is_official(runner.model_sha256), "model_files_sha256": runner.model_files_sha256,
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
    if not isinstance(found, dict):
        return "redone: the outputs carry no provenance"
    for key, reason in REDO_REASONS:
        if found.get(key) != wanted[key]:
            return reason
    return None
