"""`analyze --streams 2`: the pipelined batch gives what one runner gives, byte for byte, with a
bad image contained and a resume in the middle."""

import json
import shutil

from typer.testing import CliRunner

from trufor_trt.cli import app

OUTPUT_SUFFIXES = (".npz", ".heatmap.png", ".overlay.png")
TIMING_FREE = ("input", "outputs", "status", "score", "height", "width", "backend", "precision", "provenance")


def _records(out) -> dict:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {record["input"].rsplit("/", 1)[-1]: {key: record.get(key) for key in TIMING_FREE}
            for record in map(json.loads, lines)}


def _analyze(images, out, model, *extra):
    return CliRunner().invoke(app, ["analyze", str(images), "--out", str(out), "--model", str(model),
                                    "--backend", "onnxruntime", *extra])


def test_two_runners_write_what_one_writes_and_resume_in_the_middle(
        tmp_path, model_seed0, service_images, analyzed_service_images):
    images = tmp_path / "images"
    shutil.copytree(service_images, images)
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    names = sorted(path.name for path in service_images.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    for name in names[:3]:  # a batch that stopped after three images
        for suffix in OUTPUT_SUFFIXES:
            shutil.copy(analyzed_service_images / f"{name}{suffix}", out)

    result = _analyze(images, out, model_seed0, "--streams", "2")
    assert result.exit_code == 1, result.output  # the broken image failed, the others were done
    assert f"{len(names) - 3} analysed, 3 skipped (outputs exist), 1 failed" in result.output
    records = _records(out)
    assert [records[name]["status"] for name in names] == ["skipped"] * 3 + ["ok"] * (len(names) - 3)
    assert records["zz-broken.jpg"]["status"] == "error"
    reference = _records(analyzed_service_images)
    for name in names:
        for suffix in OUTPUT_SUFFIXES:
            assert (out / f"{name}{suffix}").read_bytes() == \
                (analyzed_service_images / f"{name}{suffix}").read_bytes(), (name, suffix)
        ours = {key: value for key, value in records[name].items() if key not in ("status", "outputs", "input")}
        theirs = {key: value for key, value in reference[name].items() if key not in ("status", "outputs", "input")}
        assert ours == theirs, name
    assert not list(out.rglob(".*.tmp"))
