"""Load the official checkpoint format strictly, with one-line reasons when a file is wrong."""

from pathlib import Path

import numpy as np
import torch

from trufor_trt.errors import CheckpointError
from trufor_trt.model.trufor import TruFor

SHOWN_KEYS = 3  # how many offending keys a message names


def _first_sentence(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def _name_some(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def read_state_dict(path) -> dict:
    """The tensors of a checkpoint: `{"state_dict": ...}` (the official file) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{_first_sentence(exc)}") from None
    if isinstance(content, dict) and "state_dict" in content:
        content = content["state_dict"]
    elif isinstance(content, dict) and "network" in content:
        raise CheckpointError(
            f"checkpoint {path}: holds only Noiseprint++ weights ('network'), "
            "not the full TruFor network (trufor.pth.tar)")
    if not isinstance(content, dict) or not all(
            isinstance(value, torch.Tensor) for value in content.values()):
        raise CheckpointError(f"checkpoint {path}: neither a state dict nor {{'state_dict': ...}}")
    return content


def describe_mismatch(expected: dict, found: dict) -> str:
    """Missing / unexpected keys and shape mismatches, in one line ('' when none)."""
    problems = []
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [f"{key} {tuple(found[key].shape)} != {tuple(expected[key].shape)}"
                  for key in expected if key in found and found[key].shape != expected[key].shape]
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_name_some(mismatched)}")
    return "; ".join(problems)


def load_trufor(path) -> TruFor:
    """A TruFor network in eval mode with the checkpoint's weights, loaded strictly."""
    state = read_state_dict(path)
    network = TruFor()
    problems = describe_mismatch(network.state_dict(), state)
    if problems:
        raise CheckpointError(f"checkpoint {path}: does not fit the TruFor network: {problems}")
    network.load_state_dict(state, strict=True)
    return network.eval()


def detection_head_arrays(network: TruFor) -> dict:
    """The detection MLP's weights as float32 numpy arrays, for the CPU postprocessor."""
    first, last = network.detection[0], network.detection[3]
    return {name: tensor.detach().cpu().numpy().astype(np.float32) for name, tensor in (
        ("hidden_weight", first.weight), ("hidden_bias", first.bias),
        ("output_weight", last.weight), ("output_bias", last.bias))}
