"""Large images, exactly, in bounded memory: row bands (Noiseprint++ and the folded decoders),
the memory budget, and a 4000 x 3000 image through `analyze` within 8 GB."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch network needs torch (the export extra)")
from typer.testing import CliRunner

from trufor_trt.architecture import EMBED_DIMS, stage_grids
from trufor_trt.bands import NOISEPRINT_HALO, decoder_groups, noiseprint_row_bands
from trufor_trt.cli import app
from trufor_trt.engine.memory_budget import GIB, MemoryBudgetError, MemoryModel, parse_memory
from trufor_trt.engine.chain import run_chain
from trufor_trt.engine.model_dir import CPU_VARIANTS, ModelDir
from trufor_trt.engine.onnxruntime_runner import FEATURES, MEMORY, CpuSessions, OnnxRuntimeRunner, SessionParts
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.export.synthetic import synthetic_image
from trufor_trt.export.verify import raw_deviation
from trufor_trt.model import load_trufor
from trufor_trt.model.formulation import OFFICIAL, Formulation, in_bands

from conftest import IMAGES_DIR


def test_noiseprint_bands_cover_every_row_once_with_the_halo_clipped_at_the_border():
    bands = noiseprint_row_bands(100, 30)
    assert [(top, bottom) for top, bottom, _, _ in bands] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert [(first, last) for _, _, first, last in bands] == [
        (0, 30 + NOISEPRINT_HALO), (30 - NOISEPRINT_HALO, 60 + NOISEPRINT_HALO),
        (60 - NOISEPRINT_HALO, 100), (90 - NOISEPRINT_HALO, 100)]  # 90 + 17 > 100: clipped


def _interpolated(planes: np.ndarray, size: tuple) -> np.ndarray:
    """F.interpolate(bilinear, align_corners=False) in float64: the exact reference."""
    return torch.nn.functional.interpolate(torch.from_numpy(planes)[None], size=size, mode="bilinear",
                                           align_corners=False)[0].numpy()


@pytest.mark.parametrize("coarse, grid, group_rows", [((7, 9), (25, 33), 4), ((2, 3), (7, 11), 3),
                                                      ((13, 17), (25, 33), 25), ((13, 17), (25, 33), 19)])
def test_decoder_groups_rebuild_the_whole_bilinear_upsampling(coarse, grid, group_rows):
    """Rows upsampled whole along the columns, then each band's interpolation matrix over
    only the coarse rows its group holds and it reads, give F.interpolate's upsampling of the
    whole map; every 1/4-grid row is in exactly one band."""
    planes = np.random.default_rng(0).standard_normal((3, *coarse))
    whole = _interpolated(planes, grid)
    widened = _interpolated(planes, (coarse[0], grid[1]))  # rows keep their positions
    banded = np.full_like(whole, np.nan)
    for group in decoder_groups([coarse[0]], grid[0], group_rows):
        (first, last), = group.coarse_rows
        held = widened[:, first:last]
        for band in group.bands:
            (start, stop), = band.reads
            assert 0 <= start < stop <= last - first and np.isnan(banded[:, band.top:band.bottom]).all()
            banded[:, band.top:band.bottom] = np.einsum("rk,ckw->crw", band.vertical[0], held[:, start:stop])
    np.testing.assert_allclose(banded, whole, rtol=0, atol=1e-13)


@pytest.fixture(autouse=True, scope="module")
def _camera_sizes_alone(no_background_plan):
    """Camera-sized images never share the machine's memory with the suite's background plan."""


@pytest.fixture(scope="module")
def float64_network(checkpoint_seed0):
    return load_trufor(checkpoint_seed0).double()


@pytest.mark.parametrize("noiseprint_rows, decoder_rows", [(None, None), (20, 4), (37, 1), (None, 19)])
def test_bounded_formulation_equals_the_official_one_in_float64(float64_network, noiseprint_rows,
                                                                decoder_rows):
    """Folded decoders, both kinds of band and the decoders' groups (19 rows: bands of 8, 8
    and 3) change nothing but float reassociation."""
    image = torch.from_numpy(prepare_input(synthetic_image(107, 141, seed=5), np.float64))
    with torch.inference_mode():
        expected = float64_network(image, OFFICIAL)
        bounded = float64_network(image, in_bands(noiseprint_rows, decoder_rows))
    for ours, theirs in zip(bounded, expected):
        assert float((ours - theirs).abs().max()) < 1e-11


def test_onnxruntime_layout_changes_nothing_but_float_reassociation(float64_network):
    """What the CPU graphs are traced with (channels-last tokens, MixFFN on the grid, token
    Linears as one matrix) computes the same network."""
    image = torch.from_numpy(prepare_input(synthetic_image(107, 141, seed=6), np.float64))
    with torch.inference_mode():
        expected = float64_network(image)
        relaid = float64_network(image, Formulation(onnxruntime_layout=True))
    for ours, theirs in zip(relaid, expected):
        assert float((ours - theirs).abs().max()) < 1e-11


@pytest.mark.slow
def test_onnxruntime_bands_equal_the_whole_image_and_the_float64_network(model_seed0, float64_network):
    """A budget small enough to force several bands of each kind at 300 x 420."""
    prepared = prepare_input(synthetic_image(300, 420, seed=9))
    budget = MEMORY.without_bands(300, 420) + 48 * 1024 ** 2
    plan = MEMORY.plan(300, 420, budget)
    assert plan.noiseprint_rows < 300 and plan.decoder_rows < 75
    with OnnxRuntimeRunner(model_seed0, max_memory_bytes=budget) as banded, \
            OnnxRuntimeRunner(model_seed0) as whole:
        in_bands_out, whole_out = banded.infer(prepared), whole.infer(prepared)
    assert max(raw_deviation(in_bands_out, whole_out).values()) < 1e-5
    with torch.inference_mode():
        truth = float64_network(torch.from_numpy(prepared.astype(np.float64)))
    errors = {name: float(np.abs(getattr(in_bands_out, name) - value[0].numpy()).max())
              for name, value in zip(("localization_logits", "confidence_logits"), truth)}
    assert max(errors.values()) < 1.5e-2, errors


def test_budget_sizes_the_bands_and_refuses_what_cannot_fit():
    model = MemoryModel(fixed_bytes=1e9, bytes_per_pixel=400, noiseprint_bytes_per_pixel=1000,
                        decoder_bytes_per_cell=16000)
    roomy, tight = model.plan(3000, 4000, 16 * GIB), model.plan(3000, 4000, 6.2e9)  # 0.4 GB of room
    assert tight.noiseprint_rows < roomy.noiseprint_rows and tight.decoder_rows < roomy.decoder_rows
    assert model.plan(100, 120, 16 * GIB).noiseprint_rows == 100  # small images: one band
    with pytest.raises(MemoryBudgetError, match=r"4000x3000 needs about 5\.\d GiB.*4\.0 GiB budget"):
        model.plan(3000, 4000, 4 * GIB)
    assert model.refusal(3000, 4000, 16 * GIB) is None


@pytest.mark.parametrize("text, expected", [("8G", 8 * GIB), ("8GiB", 8 * GIB), ("512M", 512 * 1024 ** 2),
                                            ("1.5", int(1.5 * GIB)), ("2tb", 2 * 1024 * GIB)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_rejects_nonsense():
    with pytest.raises(MemoryBudgetError, match="expected a number"):
        parse_memory("lots")


def test_image_over_the_budget_is_refused_before_decoding_and_the_batch_goes_on(tmp_path, model_seed0):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "small.png"), synthetic_image(64, 80, seed=1))
    cv2.imwrite(str(images / "large.png"), synthetic_image(1200, 1600, seed=2))
    budget = MEMORY.without_bands(1200, 1600) / GIB  # no room left for any band at 1200 x 1600
    result = CliRunner().invoke(app, ["analyze", str(images), "--model", str(model_seed0), "--out",
                                      str(tmp_path / "out"), "--backend", "onnxruntime", "--no-png",
                                      "--max-memory", f"{budget:.3f}G"])
    assert result.exit_code == 1, result.output
    records = {json.loads(line)["input"].rsplit("/", 1)[1]: json.loads(line)
               for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert records["small.png"]["status"] == "ok"
    assert records["large.png"]["status"] == "error"
    assert "1600x1200 needs about" in records["large.png"]["reason"]
    assert records["large.png"]["times_ms"]["decode"] < 50  # refused from the header


def _camera_sized_image(path, height=3000, width=4000):
    """Real photographs tiled edge to edge into one 12 MP image."""
    from PIL import Image

    sources = [np.array(Image.open(source).convert("RGB"))
               for source in sorted(IMAGES_DIR.rglob("*")) if source.suffix in (".png", ".jpg")]
    canvas, top, index = np.zeros((height, width, 3), np.uint8), 0, 0
    while top < height:
        left, row_height = 0, 0
        while left < width:
            tile = sources[index % len(sources)][:height - top, :width - left]
            canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
            left, row_height, index = left + tile.shape[1], max(row_height, tile.shape[0]), index + 1
        top += row_height
    cv2.imwrite(str(path), canvas[:, :, ::-1])


@pytest.fixture(scope="module")
def camera_analyzed(tmp_path_factory, model_seed0):
    """A 12 MP photo through `analyze` (ONNX Runtime's CPU graphs) in its own process: (the
    image, its outputs folder, that process's peak RSS in bytes)."""
    folder = tmp_path_factory.mktemp("camera")
    _camera_sized_image(folder / "camera.png")
    measure = ("import resource, subprocess, sys; "
               "done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
               "sys.exit(done.returncode)")
    command = [sys.executable, "-c", measure, sys.executable, "-m", "trufor_trt", "analyze",
               str(folder / "camera.png"), "--model", str(model_seed0), "--backend", "onnxruntime",
               "--out", str(folder / "out"), "--no-png", "--save-noiseprint"]
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    return folder / "camera.png", folder / "out", int(finished.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_4000x3000_through_onnxruntime_within_8_gb(camera_analyzed):
    """The acceptance case, end to end in its own process: peak RSS is that process's."""
    _, out, peak_bytes = camera_analyzed
    assert peak_bytes <= 8e9, f"peak RSS {peak_bytes / 1e9:.2f} GB"
    outputs = np.load(out / "camera.png.npz")
    assert outputs["map"].shape == (3000, 4000) and np.isfinite(outputs["map"]).all()


class _GivenEncoderMaps(SessionParts):
    """The chain's steps with the encoder's four maps given instead of computed (both decoder
    paths then read the same 12 MP maps); Noiseprint++ runs for the bands in `noiseprint_bands`
    only (the maps stand in for what reads it)."""

    def __init__(self, sessions, maps: dict, noiseprint_bands=()):
        super().__init__(sessions)
        self.maps, self.noiseprint_bands = maps, set(noiseprint_bands)

    def noiseprint_band(self, *band) -> None:
        if band in self.noiseprint_bands:
            super().noiseprint_band(*band)

    def encoder(self) -> None:
        self.features = self.maps


def _seeded_encoder_maps(height: int, width: int) -> dict:
    """c1..c4 (channels last) in an H x W image's shapes: seeded standard normal values."""
    rng = np.random.default_rng(12)
    return {name: rng.standard_normal((1, *grid, channels), np.float32)
            for name, grid, channels in zip(FEATURES, stage_grids(height, width), EMBED_DIMS)}


@pytest.mark.slow
def test_tensorrt_chain_on_a_12_mp_photo_equals_the_cpu_graphs(camera_analyzed, model_seed0):
    """TensorRT's chain (export/chain_parts.py) through ONNX Runtime at 12 MP, in the bands an
    Orin NX 8GB's budget gives FP32, against `analyze` on the CPU graphs, part by part on the one
    12 MP encoder run `analyze` made: Noiseprint++ cut from the TensorRT graph, in the plan's
    bands, gives `analyze`'s Noiseprint++ bit for bit (its first, a middle and its last band:
    the top and bottom borders and the halos between bands; every band is the same step at
    other rows, and the whole 12 MP Noiseprint++ is 55 s on 2 cores), so the encoder (the CPU graph's in both:
    the TensorRT form's unfused attention would take 35 GB in ONNX Runtime at 12 MP, TensorRT
    fuses it; tests/test_chain.py holds that form to the whole graph and the goldens) reads the
    same input and writes the same maps; the decoder graphs, in the plan's bands and in
    `analyze`'s, turn the same 12 MP maps into the same logits."""
    from trufor_trt.engine.chain_plan import plan_chain
    from trufor_trt.engine.memory_budget import BandPlan, physical_memory
    from trufor_trt.engine.tensorrt_plan import Profile
    from trufor_trt.export.chain_parts import CHAIN_PARTS, chain_part_graphs

    image, out, _ = camera_analyzed
    model = ModelDir.open(model_seed0)
    graphs = chain_part_graphs(model, "fp32")
    graphs["encoder"] = model.variant_path("fp32-cpu")
    plan = plan_chain("fp32", Profile((32, 32), (768, 768), (3000, 4000)), 0.3e9, 6.0 * GIB)
    analyzes = MEMORY.plan(3000, 4000, physical_memory())  # `analyze`'s bands (no --max-memory)
    assert plan.bands.noiseprint_rows < 3000
    prepared = prepare_input(cv2.imread(str(image))[:, :, ::-1])
    maps = _seeded_encoder_maps(3000, 4000)
    bands = noiseprint_row_bands(3000, plan.bands.noiseprint_rows)
    checked = [bands[0], bands[len(bands) // 2], bands[-1]]
    chain = run_chain(_GivenEncoderMaps(CpuSessions.from_files(graphs, names=CHAIN_PARTS), maps, checked),
                      prepared, plan.bands)
    cpu_graphs = CpuSessions.from_files({name: model.variant_path(name) for name in CPU_VARIANTS})
    cpu = run_chain(_GivenEncoderMaps(cpu_graphs, maps), prepared, BandPlan(3000, analyzes.decoder_rows))
    analyzed = np.load(out / "camera.png.npz")["np++"]
    assert len(bands) >= 4
    for top, bottom, _, _ in checked:
        assert np.array_equal(chain.noiseprint[top:bottom], analyzed[top:bottom]), top
    for name in ("localization_logits", "confidence_logits"):
        assert float(np.abs(getattr(chain, name) - getattr(cpu, name)).max()) < 1e-5, name
