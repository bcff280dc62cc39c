"""Calibration images: real photographs, decoded as `analyze` decodes them, recorded by hash."""

import hashlib
from pathlib import Path

from ..batch.inputs import expand_inputs
from ..engine.decode import decode_image
from ..engine.preprocess import prepare_input
from ..errors import TruforError

DEFAULT_LIMIT = 8
MAX_SIDE = 512  # larger images are centre-cropped: ranges, not content, are what is measured


def _centre_crop(rgb, side: int):
    height, width = rgb.shape[:2]
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return rgb[top:top + side, left:left + side]


def load_calibration_set(folder, limit: int = DEFAULT_LIMIT):
    """(prepared inputs, record for the manifest) from the first `limit` images of a folder."""
    jobs = expand_inputs([str(folder)])[:limit]
    if not jobs:
        raise TruforError(f"calibration folder {folder}: no images found")
    digest, inputs = hashlib.sha256(), []
    for job in jobs:
        digest.update(job.relative.encode() + b"\0" + Path(job.path).read_bytes())
        inputs.append(prepare_input(_centre_crop(decode_image(job.path), MAX_SIDE)))
    record = {"folder": Path(folder).name, "count": len(inputs), "sha256": digest.hexdigest(),
              "crop": f"centre crop to at most {MAX_SIDE} px a side",
              "files": [job.relative for job in jobs]}
    return inputs, record
