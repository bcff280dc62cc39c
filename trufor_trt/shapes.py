"""Image shapes as the command line writes them ("HxW")."""

import re

from trufor_trt.architecture import MIN_SIDE
from trufor_trt.errors import TruforError


def parse_shape(text: str) -> tuple:
    """'HxW' -> (H, W), each at least the network's minimum side."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise TruforError(f"shape {text!r}: expected HEIGHTxWIDTH, e.g. 1024x768")
    shape = int(match.group(1)), int(match.group(2))
    if min(shape) < MIN_SIDE:
        raise TruforError(f"shape {text}: each side must be at least {MIN_SIDE} px")
    return shape
