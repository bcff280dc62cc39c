"""Seeded random weights in the official checkpoint layout: what `selftest`, `bench` and
`analyze --random-weights` run when the official weights are not at hand."""

from pathlib import Path


def _random_value(name: str, like, generator):
    """PyTorch's default init leaves every output almost constant (a test that could not
    fail); these draws give realistic ranges: fan-in scaled weights, norms near 1, BatchNorm
    statistics away from the identity."""
    import torch

    def normal(std, mean=0.0):
        return torch.randn(like.shape, generator=generator) * std + mean

    if name.endswith("running_var"):
        return torch.rand(like.shape, generator=generator) + 0.5
    if name.endswith("running_mean"):
        return normal(0.1)
    if name.endswith("weight") and like.dim() >= 2:
        return normal(like[0].numel() ** -0.5)
    if name.endswith("weight"):
        return normal(0.1, mean=1.0)
    return normal(0.05)


def write_random_checkpoint(path: Path, seed: int) -> None:
    """The official file layout ({"state_dict": ...}) with seeded random weights."""
    import torch

    from trufor_trt.model import TruFor

    generator = torch.Generator().manual_seed(seed)
    state = {name: value if not value.is_floating_point() else _random_value(name, value, generator)
             for name, value in TruFor().state_dict().items()}
    torch.save({"epoch": 0, "state_dict": state}, path)
