"""Everything about TensorRT engines that runs without TensorRT: shapes, profiles, typing mode
per release, engine paths, sidecar checks, and `build`'s refusal where TensorRT is missing."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app
from trufor_trt.engine.cuda import Gpu
from trufor_trt.engine.tensorrt_plan import (DEFAULT_PROFILES, IO_CONTRACT, Profile, Sidecar, build_command,
                                             build_settings, engine_path, find_engines, io_contract_problems,
                                             profile_from_options, sidecar_path, survey_engines, validation_record)
from trufor_trt.errors import EngineError, TruforError
from trufor_trt.shapes import parse_shape
from trufor_trt.engine.tensorrt_runner import output_shape
from trufor_trt.files import sha256_bytes

from trufor_trt.precision.budgets import FP16_BUDGET, INT8_TARGET

H100 = Gpu(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), integrated=False)
ORIN = Gpu(name="Orin", compute_capability=(8, 7), integrated=True)


@pytest.mark.parametrize("text, shape", [("1024x768", (1024, 768)), (" 29 X 31 ", (29, 31))])
def test_shapes_parse(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["1024", "28x100", "axb", "100x100x3"])
def test_bad_shapes_are_refused(text):
    with pytest.raises(TruforError):
        parse_shape(text)


def test_profile_needs_ordered_shapes():
    with pytest.raises(EngineError, match="min <= opt <= max"):
        Profile(min=(64, 64), opt=(32, 64), max=(128, 128))


def test_default_profiles_follow_the_device():
    assert profile_from_options(integrated_gpu=True) == DEFAULT_PROFILES["jetson"]
    assert profile_from_options(integrated_gpu=False, max_shape="3000x4000").max == (3000, 4000)


def test_profile_refusal_names_the_build_that_fits():
    profile = Profile(min=(32, 32), opt=(512, 512), max=(1024, 1024))
    assert profile.admits(1024, 32) and not profile.admits(1025, 512)
    assert "--max-shape 3000x4000" in profile.refusal(3000, 4000)
    assert "--max-shape 1024x1500" in profile.refusal(600, 1500)
    assert "smaller --min-shape" in Profile(min=(64, 64), opt=(64, 64), max=(64, 64)).refusal(40, 64)


@pytest.mark.parametrize("version", ["10.0.1.6", "10.3.0", "10.11.0.33", "10.12.0", "11.4.0.106"])
def test_every_supported_release_builds_strongly_typed_without_precision_flags_and_tf32(version):
    # Weak typing would let 10.0-10.11 run any layer in FP16 with BuilderFlag.FP16, whatever the
    # ONNX says; TF32 (on by default) would round FP32 products on Ampere and newer.
    settings = build_settings(version)
    assert settings.strongly_typed
    assert settings.precision_flags == ()
    assert settings.cleared_flags == ("TF32",) and settings.tf32 is False


@pytest.mark.parametrize("version", ["9.3.0", "8.5.2.2", "8.6.1"])
def test_tensorrt_before_10_is_refused_in_one_line(version):
    with pytest.raises(EngineError, match=f"TensorRT {version} is too old.*>= 10.0") as caught:
        build_settings(version)
    assert "\n" not in str(caught.value)


def test_engine_io_is_checked_against_the_model_contract():
    assert io_contract_problems(dict(IO_CONTRACT)) == []
    half_output = {**IO_CONTRACT, "noiseprint": ("output", "HALF")}
    assert io_contract_problems(half_output) == ["tensor noiseprint is output HALF, expected output FLOAT"]
    renamed = {("input_1" if name == "image" else name): value for name, value in IO_CONTRACT.items()}
    assert io_contract_problems(renamed) == ["tensor image is missing", "unexpected tensor input_1"]


def test_engine_paths_name_gpu_compute_capability_and_tensorrt(tmp_path):
    profile = DEFAULT_PROFILES["datacenter"]
    path = engine_path(tmp_path, H100, "10.13.0", "fp16", profile)
    assert path == (tmp_path / "engines" / "nvidia-h100-80gb-hbm3-sm90-trt10.13.0"
                    / "fp16-32x32_1024x1024_2048x2048.engine")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert find_engines(tmp_path, H100, "10.13.0", "fp16") == [path]
    assert find_engines(tmp_path, ORIN, "10.13.0", "fp16") == []
    assert find_engines(tmp_path, H100, "10.13.0", "int8") == []


def _overall(map_max=1e-3, conf_max=5e-4, score=2e-4, noiseprint=1e-3, flipped=0) -> dict:
    """validate.ValidationReport.overall()'s worst errors, as a validation measured them."""
    return {"images": 3, "map_max": map_max, "map_mean": map_max / 10, "conf_max": conf_max,
            "conf_mean": conf_max / 10, "score_error_max": score, "noiseprint_max": noiseprint,
            "decisions_flipped": flipped}


def _sidecar(**changes):
    values = dict(precision="fp16", profile={"min": [32, 32], "opt": [64, 64], "max": [96, 96]},
                  tensorrt_version="10.3.0", device=ORIN.name, compute_capability=[8, 7],
                  onnx_file="trufor_fp16.onnx", onnx_sha256="abc", strongly_typed=True,
                  builder_flags=[], cleared_flags=["TF32"], tf32=False, workspace_gib=4.0,
                  build_seconds=12.5, engine_sha256=sha256_bytes(b""),
                  validation=validation_record(_overall(), FP16_BUDGET, "synthetic"))
    values.update(changes)
    return Sidecar(**values)


def test_sidecar_round_trips_and_says_why_an_engine_cannot_run(tmp_path):
    path = sidecar_path(tmp_path / "fp16-x.engine")
    _sidecar().write(path)
    sidecar = Sidecar.read(path)
    assert sidecar == _sidecar() and sidecar.profile_object().max == (96, 96)
    assert sidecar.mismatch(ORIN, "10.3.0", "abc") == ""
    assert "TensorRT 10.3.0, this is 10.4.0" in sidecar.mismatch(ORIN, "10.4.0", "abc")
    assert "built for Orin (sm87), this is NVIDIA H100" in sidecar.mismatch(H100, "10.3.0", "abc")
    assert "another ONNX graph" in sidecar.mismatch(ORIN, "10.3.0", "other")
    for weak in (_sidecar(strongly_typed=False, builder_flags=["FP16"]), _sidecar(tf32=True)):
        assert "weakly typed or with TF32" in weak.mismatch(ORIN, "10.3.0", "abc")
    with pytest.raises(EngineError, match="sidecar"):
        Sidecar.read(tmp_path / "missing.json")


def test_an_engine_that_is_not_the_one_its_sidecar_describes_is_never_loaded(tmp_path):
    engine = tmp_path / "fp16-x.engine"
    engine.write_bytes(b"serialized engine")
    sidecar = _sidecar(engine_sha256=sha256_bytes(b"serialized engine"))
    assert sidecar.engine_bytes(engine) == b"serialized engine"
    engine.write_bytes(b"an older engine, left by an interrupted rebuild")
    with pytest.raises(EngineError, match="differs from the engine its sidecar describes"):
        sidecar.engine_bytes(engine)


def test_a_sidecar_from_an_older_version_asks_for_a_rebuild(tmp_path):
    path = sidecar_path(tmp_path / "fp16-x.engine")
    values = json.loads(json.dumps(asdict(_sidecar())))
    del values["tf32"], values["cleared_flags"]
    path.write_text(json.dumps(values))
    with pytest.raises(EngineError, match="another trufor-trt version.*build the engine again"):
        Sidecar.read(path)
    path.write_text("{not json")
    with pytest.raises(EngineError, match="unreadable"):
        Sidecar.read(path)


def _engine(folder: Path, profile: Profile, **changes) -> Path:
    path = engine_path(folder, ORIN, "10.3.0", "fp16", profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    _sidecar(profile=profile.as_dict(), **changes).write(sidecar_path(path))
    return path


def test_a_chain_takes_the_images_beyond_the_whole_image_engines(tmp_path):
    """A chain (a folder of part engines, one sidecar beside it) is surveyed with the engines:
    images a whole-image engine admits go to it, larger ones to the chain."""
    whole = _engine(tmp_path, Profile(min=(32, 32), opt=(768, 768), max=(1536, 1536)))
    chain_profile = Profile(min=(32, 32), opt=(768, 768), max=(3000, 4000))
    chain = engine_path(tmp_path, ORIN, "10.3.0", "fp16", chain_profile, chain=True)
    chain.mkdir(parents=True)
    record = {"bands": {"noiseprint_rows": 459, "decoder_rows": 32}, "parts": {}, "estimated_device_bytes": 1}
    _sidecar(profile=chain_profile.as_dict(), chain=record).write(sidecar_path(chain))
    assert sidecar_path(chain).name == f"fp16-chain-{chain_profile.tag()}.json"
    survey = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc")
    assert [path for path, _ in survey.usable] == [whole, chain]
    assert survey.for_image(1536, 1024)[0] == whole
    assert survey.for_image(3000, 4000)[0] == chain and survey.for_image(3000, 4000)[1].chain == record
    assert "--max-shape 3001x4000" in survey.refusal(3001, 100)


def test_each_image_gets_the_smallest_engine_whose_profile_admits_it(tmp_path):
    # Names sort opposite to sizes: "32x32_64x64_96x96" > "32x32_512x512_2048x2048".
    small = _engine(tmp_path, Profile(min=(32, 32), opt=(64, 64), max=(96, 96)))
    large = _engine(tmp_path, Profile(min=(32, 32), opt=(512, 512), max=(2048, 2048)))
    middle = _engine(tmp_path, Profile(min=(32, 32), opt=(256, 256), max=(512, 1024)))
    stale = _engine(tmp_path, Profile(min=(32, 32), opt=(128, 128), max=(4096, 4096)), onnx_sha256="old")
    survey = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc")
    assert [path for path, _ in survey.usable] == [small, middle, large]
    assert [path for path, _ in survey.rejected] == [stale]
    assert survey.for_image(90, 96)[0] == small
    assert survey.for_image(97, 96)[0] == middle
    assert survey.for_image(300, 1024)[0] == middle
    assert survey.for_image(600, 1024)[0] == large
    assert survey.for_image(3000, 100) is None
    assert "--max-shape 3000x2048" in survey.refusal(3000, 100) and survey.refusal(64, 64) == ""
    assert survey.problem("fp16", ORIN, "10.3.0", tmp_path) == ""
    none_usable = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "new graph")
    assert "another ONNX graph" in none_usable.problem("fp16", ORIN, "10.3.0", tmp_path)
    assert "trufor-trt build" in none_usable.problem("fp16", ORIN, "10.3.0", tmp_path)


def test_a_validation_record_holds_the_precisions_budget_and_no_flip():
    within = validation_record(_overall(), FP16_BUDGET, "calib")
    assert within["within_budget"] and within["summary"] == "within budget"
    assert within["max_abs"] == {"map": 1e-3, "conf": 5e-4, "score": 2e-4, "np++": 1e-3}
    over = validation_record(_overall(map_max=7.9e-2, score=4.4e-2, flipped=1), INT8_TARGET, "calib")
    assert not over["within_budget"]
    assert over["summary"] == "map 0.079 > 0.05; score 0.044 > 0.02; 1 decision(s) flipped"
    assert not validation_record(_overall(noiseprint=float("inf")), FP16_BUDGET, "calib")["within_budget"]


def test_reduced_precision_engines_run_only_validated_within_budget_unless_accepted(tmp_path):
    validated = _engine(tmp_path, Profile(min=(32, 32), opt=(64, 64), max=(96, 96)))
    never = _engine(tmp_path, Profile(min=(32, 32), opt=(64, 64), max=(128, 128)), validation=None)
    over = _engine(tmp_path, Profile(min=(32, 32), opt=(64, 64), max=(160, 160)),
                   validation=validation_record(_overall(map_max=2e-2), FP16_BUDGET, "calib"))
    survey = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc")
    assert [path for path, _ in survey.usable] == [validated]
    reasons = dict(survey.rejected)
    assert reasons[never].startswith("not validated on its GPU") and "--accept-unvalidated" in reasons[never]
    assert reasons[over] == "over its budget when validated: map 0.02 > 0.005 (--accept-unvalidated runs it anyway)"
    accepted = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc", accept_unvalidated=True)
    assert [path for path, _ in accepted.usable] == [validated, never, over]
    only = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc", accept_unvalidated=True, only=over)
    assert [path for path, _ in only.usable] == [over]


def test_fp32_engines_need_no_validation():
    assert _sidecar(precision="fp32", validation=None).validation_problem() == ""


def test_build_command_reproduces_the_profile():
    profile = Profile(min=(32, 32), opt=(64, 80), max=(96, 128))
    assert build_command(Path("m"), "int8", profile) == (
        "trufor-trt build --model m --int8 --min-shape 32x32 --opt-shape 64x80 --max-shape 96x128")
    batched = Profile(min=(32, 32), opt=(64, 80), max=(96, 128), max_batch=8)
    assert build_command(Path("m"), "int8", batched).endswith("--max-shape 96x128 --max-batch 8")


def test_a_batch_profile_spans_one_to_its_batch_and_is_preferred_for_its_sizes(tmp_path):
    batched = Profile(min=(32, 32), opt=(64, 64), max=(96, 96), max_batch=8)
    assert batched.input_shapes() == ((1, 3, 32, 32), (8, 3, 64, 64), (8, 3, 96, 96))
    assert Profile(min=(32, 32), opt=(64, 64), max=(96, 96)).input_shapes()[2] == (1, 3, 96, 96)
    assert batched.tag() == "32x32_64x64_96x96_b8"
    with pytest.raises(EngineError, match="at least 1"):
        Profile(min=(32, 32), opt=(64, 64), max=(96, 96), max_batch=0)
    single = _engine(tmp_path, Profile(min=(32, 32), opt=(64, 64), max=(96, 96)))
    several = _engine(tmp_path, batched)
    assert "max_batch" not in json.loads(sidecar_path(single).read_text())["profile"]  # older readers
    survey = survey_engines(tmp_path, ORIN, "10.3.0", "fp16", "abc")
    assert survey.for_image(64, 64)[0] == several
    assert survey.for_image(64, 64)[1].profile_object() == batched


@pytest.mark.parametrize("height, width", [(29, 29), (173, 229), (1536, 2048)])
def test_output_shapes_follow_the_network_grid(height, width):
    grid = (-(-height // 4), -(-width // 4))  # ceil(side / 4): the 7x7 stride-4 patch embedding
    assert output_shape("localization_logits", height, width) == (1, 2, *grid)
    assert output_shape("confidence_logits", height, width) == (1, 1, *grid)
    assert output_shape("noiseprint", height, width) == (1, 1, height, width)


def test_build_names_a_missing_folder_or_graph_before_tensorrt(tmp_path, model_seed0):
    """Issue 41: `build` spoke of TensorRT where the folder, or its FP16 graph, was missing."""
    missing = CliRunner().invoke(app, ["build", "--fp16", "--model", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "no such folder" in missing.output and "TensorRT" not in missing.output
    no_graph = CliRunner().invoke(app, ["build", "--fp16", "--model", str(model_seed0)])
    lines = no_graph.output.strip().splitlines()
    assert no_graph.exit_code == 2 and len(lines) == 1, no_graph.output
    assert "has no FP16 graph" in lines[0] and "--precision fp16 --calib-images DIR" in lines[0]


def test_build_needs_exactly_one_precision():
    result = CliRunner().invoke(app, ["build", "--fp16", "--int8"])
    assert result.exit_code == 2 and "exactly one" in result.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the refusal path does not apply")
def test_tensorrt_selftest_without_tensorrt_exits_2_at_once():
    result = CliRunner().invoke(app, ["selftest", "--backend", "tensorrt", "--precision", "fp16"])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output
    assert "exporting" not in result.output
