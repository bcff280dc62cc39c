"""Strict loading of the official checkpoint format, and one-line reasons for wrong files."""

from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch network needs torch (the export extra)")
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.errors import CheckpointError
from trufor_trt.model import TruFor, load_trufor, read_state_dict

from conftest import SHARED, make_checkpoint

pytestmark = pytest.mark.shared

NOISEPRINT_ONLY = SHARED / "weights" / "noiseprint_pp.th"


def test_network_keys_are_the_official_schema():
    import json

    schema = json.loads((SHARED / "reference" / "checkpoint_schema.json").read_text())["schema"]
    state = TruFor().state_dict()
    assert [(key, list(value.shape)) for key, value in state.items()] == \
        [(key, shape) for key, shape, _ in schema]


def test_bare_state_dict_loads_like_the_wrapped_file(tmp_path, checkpoint_seed0):
    bare = tmp_path / "bare.pth"
    torch.save(read_state_dict(checkpoint_seed0), bare)
    wrapped, unwrapped = load_trufor(checkpoint_seed0), load_trufor(bare)
    for (key, left), right in zip(wrapped.state_dict().items(), unwrapped.state_dict().values()):
        assert torch.equal(left, right), key
    assert not wrapped.training


def _renamed(tmp_path, checkpoint):
    state = OrderedDict(read_state_dict(checkpoint))
    state["backbone.FRMs.0.renamed"] = state.pop("backbone.FRMs.0.channel_weights.mlp.0.bias")
    path = tmp_path / "renamed.pth.tar"
    torch.save({"state_dict": state}, path)
    return path, ["backbone.FRMs.0.channel_weights.mlp.0.bias", "backbone.FRMs.0.renamed"]


def _reshaped(tmp_path, checkpoint):
    state = OrderedDict(read_state_dict(checkpoint))
    state["detection.0.weight"] = torch.zeros(128, 9)
    path = tmp_path / "reshaped.pth.tar"
    torch.save({"state_dict": state}, path)
    return path, ["detection.0.weight", "(128, 9) != (128, 8)"]


def _truncated(tmp_path, checkpoint):
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(checkpoint.read_bytes()[:1_000_000])
    return path, ["not a readable PyTorch checkpoint"]


def _noiseprint_only(tmp_path, checkpoint):
    return NOISEPRINT_ONLY, ["only Noiseprint++ weights"]


def _not_a_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    return path, ["not a readable PyTorch checkpoint"]


def _missing(tmp_path, checkpoint):
    return tmp_path / "absent.pth.tar", ["no such file"]


WRONG_CHECKPOINTS = {"renamed_key": _renamed, "wrong_shape": _reshaped, "truncated": _truncated,
                     "noiseprint_only": _noiseprint_only, "not_a_checkpoint": _not_a_checkpoint,
                     "missing": _missing}


@pytest.mark.parametrize("case", sorted(WRONG_CHECKPOINTS))
def test_wrong_checkpoint_raises_one_line_naming_the_problem(tmp_path, checkpoint_seed0, case):
    path, fragments = WRONG_CHECKPOINTS[case](tmp_path, checkpoint_seed0)
    with pytest.raises(CheckpointError) as raised:
        load_trufor(path)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", ["renamed_key", "truncated", "noiseprint_only"])
def test_analyze_exits_2_on_a_wrong_checkpoint(tmp_path, checkpoint_seed0, case):
    path, fragments = WRONG_CHECKPOINTS[case](tmp_path, checkpoint_seed0)
    image = SHARED / "data" / "images" / "pristine1.jpg"
    result = CliRunner().invoke(app, ["analyze", str(image), "--out", str(tmp_path / "out"),
                                      "--checkpoint", str(path), "--backend", "torch"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragments[0] in lines[0], result.output
    assert not (tmp_path / "out" / "pristine1.jpg.npz").exists()


def test_another_seed_loads_strictly(tmp_path):
    network = load_trufor(make_checkpoint(tmp_path / "seed3.pth.tar", 3))
    assert sum(value.numel() for value in network.state_dict().values()) == 68_705_510
