"""Calibration images: real photographs, decoded as `analyze` decodes them, recorded by hash.

Two sets from one folder:
- the search set: the first `limit` images, centre-cropped to CROP_SIDE (ranges and
  sensitivities, not content, are what is measured; small crops keep the plan's many trials
  affordable);
- the every-size set: up to FULL_SIZE_LIMIT of the folder's largest images at full size
  (centre-cropped to the engine profile's max shape where larger): deviation grows with the
  image, so the plan is checked at the sizes the engine will see (none where the max shape is
  no larger than the crops).
"""

import hashlib
from pathlib import Path

from trufor_trt.batch.inputs import expand_inputs
from trufor_trt.engine.decode import decode_image
from trufor_trt.engine.preprocess import prepare_input, size_label
from trufor_trt.errors import TruforError

DEFAULT_LIMIT = 8
CROP_SIDE = 256
FULL_SIZE_LIMIT = 2


def _centre_crop(rgb, height: int, width: int):
    top, left = max(0, (rgb.shape[0] - height) // 2), max(0, (rgb.shape[1] - width) // 2)
    return rgb[top:top + height, left:left + width]


def _pixels(path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    except (OSError, ValueError):
        return 0  # not readable by Pillow: decode_image will say why, if it is picked


def load_calibration_set(folder, limit: int = DEFAULT_LIMIT, max_shape=None):
    """(search inputs, full-size inputs, record for the manifest). `max_shape`: (H, W) of the
    largest image the variant's engines will take; None: no every-size set."""
    jobs = expand_inputs([str(folder)])
    if not jobs:
        raise TruforError(f"calibration folder {folder}: no images found")
    search = jobs[:limit]
    # Up to CROP_SIDE a side, the full-size set would be the search crops again.
    beyond_crops = max_shape is not None and max(max_shape) > CROP_SIDE
    larger = [job for job in jobs if _pixels(job.path) > CROP_SIDE * CROP_SIDE] if beyond_crops else []
    full_size = sorted(larger, key=lambda job: -_pixels(job.path))[:FULL_SIZE_LIMIT]
    digest = hashlib.sha256()
    for job in {job.relative: job for job in search + full_size}.values():
        digest.update(job.relative.encode() + b"\0" + Path(job.path).read_bytes())
    inputs = [prepare_input(_centre_crop(decode_image(job.path), CROP_SIDE, CROP_SIDE)) for job in search]
    large = [prepare_input(_centre_crop(decode_image(job.path), *max_shape)) for job in full_size]
    record = {"folder": Path(folder).name, "count": len(inputs), "sha256": digest.hexdigest(),
              "crop": f"centre crop to at most {CROP_SIDE} px a side",
              "files": [job.relative for job in search],
              "full_size_files": [job.relative for job in full_size],
              "sizes": sorted({size_label(x) for x in inputs}) + [size_label(x) for x in large]}
    return inputs, large, record
