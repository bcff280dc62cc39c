"""PyTorch TruFor, key-for-key compatible with the official checkpoint (needs torch)."""

from .checkpoint import detection_head_arrays, load_trufor, read_state_dict
from .trufor import OUTPUT_NAMES, TruFor

__all__ = ["TruFor", "OUTPUT_NAMES", "load_trufor", "read_state_dict", "detection_head_arrays"]
