"""PyTorch TruFor, key-for-key compatible with the official checkpoint (needs torch)."""

from trufor_trt.model.checkpoint import detection_head_arrays, load_trufor, read_state_dict
from trufor_trt.model.trufor import TruFor

__all__ = ["TruFor", "load_trufor", "read_state_dict", "detection_head_arrays"]
