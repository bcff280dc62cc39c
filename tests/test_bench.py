"""`trufor-trt bench`: statistics and FLOP counting on known data, and the command end to end on
a tiny size (every field of its JSON, the markdown block, a failing case). No assertion on
absolute times: those are numbers for the README, not for tests."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.benchmarks.flops import network_flops
from trufor_trt.benchmarks.report import MARKDOWN_BEGIN, MARKDOWN_END
from trufor_trt.benchmarks.stats import busiest, summarize
from trufor_trt.cli import app

STATS_KEYS = {"n", "min", "mean", "median", "p90", "p99", "max"}
CPU_STAGES = {"decode", "preprocess", "inference", "postprocess", "end_to_end"}


def test_summary_statistics_on_known_samples():
    summary = summarize(np.arange(1, 101))
    assert summary == {"n": 100, "min": 1.0, "mean": 50.5, "median": 50.5,
                       "p90": pytest.approx(90.1), "p99": pytest.approx(99.01), "max": 100.0}
    assert summarize([7.0]) == dict.fromkeys(STATS_KEYS - {"n"}, 7.0) | {"n": 1}
    assert summarize([3, 1, 2])["median"] == 2.0
    with pytest.raises(ValueError):
        summarize([])


def test_bottleneck_is_the_stage_busy_longest_per_worker():
    stage, utilisation = busiest({"decode": 100.0, "inference": 1500.0, "post": 50.0}, 1000.0,
                                 {"decode": 1, "inference": 2, "post": 1})
    assert stage == "inference"
    assert utilisation == {"decode": 0.1, "inference": 0.75, "post": 0.05}


def test_flop_count_matches_the_official_table():
    """TRUFOR_NETWORK.md's counts (PyTorch's FLOP counter on the official code), in GFLOP."""
    official = {256: (111.5, 72.8, 20.5, 18.2), 512: (457.7, 291.1, 93.7, 73.0)}
    for side, expected in official.items():
        parts = network_flops(side, side)
        counted = [parts[name] / 1e9 for name in ("total", "noiseprint", "encoder", "decoders")]
        # The table keeps one decimal (its 512 px decoder entry reads 73.0 for our 72.93).
        assert counted == pytest.approx(expected, abs=0.1)


def test_flop_count_equals_pytorchs_counter_on_our_network_at_an_odd_size(checkpoint_seed0):
    """Exact, integer for integer: odd sizes exercise every stage's rounding of the grid."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from trufor_trt.model import load_trufor
    from trufor_trt.model.formulation import OFFICIAL

    network = load_trufor(checkpoint_seed0)
    # The official formulation: explicit attention products (the counter does not see the CPU
    # flash kernel's) and the unfolded decoders.
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.rand(1, 3, 61, 83), OFFICIAL)
    assert network_flops(61, 83)["total"] == counter.get_total_flops()


def _bench(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory, model_seed0, checkpoint_seed0):
    folder = tmp_path_factory.mktemp("bench")
    readme = folder / "README.md"
    readme.write_text(f"# title\n\nbefore\n{MARKDOWN_BEGIN}\nold table\n{MARKDOWN_END}\nafter\n")
    result = _bench("--model", model_seed0, "--checkpoint", checkpoint_seed0, "--backend", "onnxruntime",
                    "--sizes", "48x64,40x56", "--warmup", 1, "--repeat", 3, "--streams", 2,
                    "--compare", "torch", "--json", folder / "bench.json", "--markdown", readme)
    assert result.exit_code == 0, result.output
    return json.loads((folder / "bench.json").read_text()), readme.read_text(), result.output


def test_bench_json_has_every_field(bench_report):
    report, _, _ = bench_report
    assert {"cpu", "physical_cores", "simd", "memory_bytes", "versions"} <= set(report["machine"])
    assert {"python", "numpy", "onnxruntime", "torch"} <= set(report["machine"]["versions"])
    assert report["cpu_gemm_gflops"]["numpy"] > 0
    assert report["flops_by_precision"] == []  # an FP32 run: no reduced-precision record
    assert report["settings"] == {"warmup": 1, "repeat": 3, "streams": 2, "device": "auto"}
    assert [(run["input"], run["role"], run["backend"]) for run in report["runs"]] == [
        ("48x64", "engine", "onnxruntime"), ("48x64", "reference", "torch"),
        ("40x56", "engine", "onnxruntime"), ("40x56", "reference", "torch")]
    for run in report["runs"]:
        stream = run["single_stream"]
        assert set(stream["stats_ms"]) == CPU_STAGES
        for stats in stream["stats_ms"].values():
            assert set(stats) == STATS_KEYS and stats["n"] == 3
            assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        # End to end is its own clock around every stage, not a sum of means.
        samples = stream["samples_ms"]
        assert all(total >= inference for total, inference in zip(samples["end_to_end"], samples["inference"]))
        assert run["gflop_per_image"] * 1e9 == pytest.approx(
            network_flops(*map(int, run["input"].split("x")))["total"])
        assert run["achieved_gflops"] > 0 and run["fraction_of_gemm_rate"] > 0
        # The folded decoders run fewer FLOPs than the official network (the reference).
        assert (run["executed_gflop_per_image"] < run["gflop_per_image"]) == (run["role"] == "engine")
        assert run["seconds_per_megapixel"] > 0 and run["peak_rss_gib_per_megapixel"] > 0
        assert run["memory"]["host_peak_rss_bytes"] >= run["host_rss_after_load_bytes"] > 0
        assert run["memory"]["device_peak_bytes"] is None
        _check_parts(run)
    offline = report["runs"][0]["offline"]
    assert offline["streams"] == 2 and offline["threads_per_runner"] >= 1
    assert offline["images"] >= 4 and offline["images_per_s"] > 0
    assert offline["bottleneck"] in offline["busy_ms"]
    assert set(offline["utilisation"]) == {"host", "inference"}
    assert [item["input"] for item in report["comparisons"]] == ["48x64", "40x56"]
    assert all(item["speedup_end_to_end"] > 0 and item["speedup_inference"] > 0
               for item in report["comparisons"])


def _check_parts(run: dict) -> None:
    """ONNX Runtime runs the network in parts and each is timed; the PyTorch reference is one
    forward pass and has none."""
    parts, stats = run["single_stream"]["parts"], run["single_stream"]["stats_ms"]
    if run["backend"] != "onnxruntime":
        assert parts == {}
        return
    assert set(parts) == {"noiseprint", "encoder", "decoders"}
    assert sum(part["stats_ms"]["median"] for part in parts.values()) <= stats["inference"]["max"]
    size = map(int, run["input"].split("x"))
    executed = network_flops(*size, folded_decoders=True)
    for name, part in parts.items():
        assert part["stats_ms"]["n"] == 3 and 0 < part["share_of_end_to_end"] < 1
        assert part["executed_gflop_per_image"] * 1e9 == pytest.approx(executed[name])
        assert part["achieved_gflops"] > 0


def test_bench_prints_tables_and_rewrites_only_the_marked_block(bench_report):
    _, readme, output = bench_report
    assert "SingleStream latency" in output and "faster end to end" in output
    assert readme.startswith("# title\n\nbefore\n" + MARKDOWN_BEGIN)
    assert readme.endswith(MARKDOWN_END + "\nafter\n")
    assert "old table" not in readme
    assert "| 48x64 | onnxruntime fp32 |" in readme and "| 40x56 | torch fp32 (reference) |" in readme
    assert "Inference by part" in output and "| input | runner | noiseprint | encoder | decoders |" in readme


def test_bench_plot_is_a_png(tmp_path, bench_report):
    pytest.importorskip("matplotlib", reason="--plot needs the bench extra (matplotlib)")
    from trufor_trt.benchmarks.report import write_plot

    write_plot(bench_report[0], tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")


def test_a_failing_case_is_reported_and_sets_the_exit_code(tmp_path, model_seed0):
    """The model folder has no fp16 variant: that case fails with its reason, exit 1."""
    result = _bench("--model", model_seed0, "--backend", "onnxruntime", "--precision", "fp16",
                    "--sizes", "48x64", "--repeat", 1, "--streams", 0, "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert "fp16" in run["error"] and "\n" not in run["error"]


@pytest.mark.parametrize("args, message", [
    (["--sizes", "512"], "expected HEIGHTxWIDTH"),
    (["--compare", "tensorflow"], "only torch"),
])
def test_bad_arguments_are_one_line_setup_errors(model_seed0, args, message):
    result = _bench("--model", model_seed0, "--backend", "onnxruntime", *args)
    assert result.exit_code == 2 and message in result.output
