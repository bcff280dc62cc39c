"""`trufor-trt bench`: every case in a fresh process, then one report.

Why a process per case: peak memory is then the case's own (a process's high-water mark
never falls), thread pools of one backend (PyTorch's OpenMP workers) cannot steal cores from
the next, and a case that runs out of memory is reported instead of ending the run.
"""

import datetime
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import cv2

from trufor_trt import __version__
from trufor_trt.batch.inputs import expand_inputs
from trufor_trt.engine import pick_backend
from trufor_trt.shapes import parse_shape
from trufor_trt.errors import TruforError
from trufor_trt.export.synthetic import synthetic_image

from trufor_trt.benchmarks.cases import CaseSpec, measure_gemm_rates, run_case
from trufor_trt.benchmarks.flops import network_flops
from trufor_trt.benchmarks.machine import machine_info
from trufor_trt.benchmarks.stats import busiest, summarize

REFERENCE = "torch fp32 (official formulation, eager, batch 1)"


@dataclass(frozen=True)
class BenchOptions:
    model: Optional[Path] = None
    checkpoint: Optional[Path] = None
    backend: str = "auto"
    precision: str = "fp32"
    sizes: tuple = ((512, 512),)
    images: Optional[Path] = None
    warmup: int = 1
    repeat: int = 5
    streams: int = 1
    compare_torch: bool = False
    device: str = "auto"
    peak_gflops: Optional[float] = None
    host_only: bool = False
    workers: int = 0  # host-only: 1..workers (0: every core)


@dataclass(frozen=True)
class InputGroup:
    label: str
    paths: tuple


def parse_sizes(text: str) -> tuple:
    """'512x512,1024x768' -> ((512, 512), (1024, 768)) (HEIGHTxWIDTH each)."""
    return tuple(parse_shape(part) for part in text.split(",") if part.strip())


def in_fresh_process(function, *args):
    """function(*args) in a new spawned process; its result or its exception."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def synthetic_file(height: int, width: int, folder: Path, suffix: str = ".png") -> Path:
    """A deterministic synthetic photograph of this size, as a file (decoding is measured too)."""
    path = folder / f"synthetic_{height}x{width}{suffix}"
    cv2.imwrite(str(path), synthetic_image(height, width, seed=height * 7919 + width)[:, :, ::-1])
    return path


def synthetic_groups(sizes, folder: Path) -> list:
    return [InputGroup(f"{height}x{width}", (str(synthetic_file(height, width, folder)),)) for height, width in sizes]


def image_group(folder: Path) -> InputGroup:
    paths = tuple(str(job.path) for job in expand_inputs([str(folder)]))
    if not paths:
        raise TruforError(f"--images {folder}: no images found")
    return InputGroup(str(folder), paths)


def resolve_sources(options: BenchOptions, on_step) -> tuple:
    """(model folder or None, checkpoint or None, what weights these are)."""
    checkpoint = options.checkpoint
    weights = f"checkpoint {checkpoint}" if checkpoint else None
    if checkpoint is None and options.model is None:
        from trufor_trt.export.cache import RANDOM_SEED, random_checkpoint

        on_step(f"no --checkpoint or --model: timing random weights (seed {RANDOM_SEED}); "
                "speed does not depend on the weights' values")
        checkpoint = random_checkpoint()
        weights = f"random (seed {RANDOM_SEED}, official layout)"
    if options.compare_torch and checkpoint is None:
        raise TruforError("--compare torch runs the PyTorch network: give --checkpoint (the model's source)")
    model = options.model
    if model is None and options.backend != "torch":
        from trufor_trt.export.cache import cached_model_dir

        model = cached_model_dir(checkpoint, on_step=on_step).path
    return model, checkpoint, weights or f"model folder {model}"


def _achieved(run: dict, flop_per_image: list, gemm: dict, nominal_peak: Optional[float]) -> None:
    """GFLOP/s over the recorded inferences; its share of the best measured GEMM rate and,
    when the user gave one, of the machine's nominal peak."""
    inference_s = sum(run["single_stream"]["samples_ms"]["inference"]) / 1e3
    run["achieved_gflops"] = sum(flop_per_image) / inference_s / 1e9
    if gemm:
        run["fraction_of_gemm_rate"] = run["achieved_gflops"] / max(gemm.values())
    if nominal_peak:
        run["fraction_of_peak"] = run["achieved_gflops"] / nominal_peak


def _parts(samples_ms: dict, shapes: list, end_to_end: dict) -> dict:
    """Per part of the network (runners that time them): its times, its share of the end-to-end
    median and its GFLOP/s on the FLOPs it executes (decoders folded)."""
    parts = {}
    for name, samples in samples_ms.items():
        executed = sum(network_flops(*shape, folded_decoders=True)[name] for shape in shapes)
        stats = summarize(samples)
        parts[name] = {"stats_ms": stats, "share_of_end_to_end": stats["median"] / end_to_end["median"],
                       "executed_gflop_per_image": executed / len(shapes) / 1e9,
                       "achieved_gflops": executed / (sum(samples) / 1e3) / 1e9}
    return parts


def _mean(values) -> float:
    return sum(values) / len(values)


def _summarise(result: dict, group: InputGroup, gemm: dict, nominal_peak, official: bool) -> dict:
    """Statistics, FLOP/s (against the official network's FLOPs, the work that defines the
    result; `executed_gflop_per_image` is what the folded decoders actually run) and the
    per-megapixel figures of one case."""
    stream = result["single_stream"]
    shapes = stream.pop("shapes")
    flop_per_image = [network_flops(*shape)["total"] for shape in shapes]
    executed = [network_flops(*shape, folded_decoders=not official)["total"] for shape in shapes]
    megapixels = _mean([height * width / 1e6 for height, width in shapes])
    run = {"input": group.label, "images": len(group.paths), "megapixels": megapixels,
           "gflop_per_image": _mean(flop_per_image) / 1e9,
           "executed_gflop_per_image": _mean(executed) / 1e9, **result}
    stream["stats_ms"] = {name: summarize(samples) for name, samples in stream["samples_ms"].items()}
    run["seconds_per_megapixel"] = stream["stats_ms"]["end_to_end"]["median"] / 1e3 / megapixels
    run["peak_rss_gib_per_megapixel"] = result["memory"]["host_peak_rss_bytes"] / 1024 ** 3 / megapixels
    on_cpu = result["memory"]["device_peak_bytes"] is None  # the GEMM rates are the CPU's
    _achieved(run, flop_per_image, gemm if on_cpu else {}, nominal_peak)
    stream["parts"] = _parts(stream.pop("parts_samples_ms"), shapes, stream["stats_ms"]["end_to_end"])
    if "offline" in result:
        offline = result["offline"]
        offline["images_per_s"] = offline["images"] / (offline["wall_ms"] / 1e3)
        offline["bottleneck"], offline["utilisation"] = busiest(
            offline["busy_ms"], offline["wall_ms"], offline["workers"])
    return run


def _run_group(spec: CaseSpec, group: InputGroup, gemm: dict, nominal_peak, role: str) -> dict:
    try:
        result = in_fresh_process(run_case, replace(spec, images=group.paths))
        return {"role": role, **_summarise(result, group, gemm, nominal_peak, spec.official)}
    except BrokenProcessPool:
        reason = "the benchmark process died (out of memory?)"
    except Exception as exc:  # reported per case; the other cases still run
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return {"role": role, "input": group.label, "backend": spec.backend, "precision": spec.precision,
            "error": reason}


def _comparison(engine: dict, reference: dict) -> Optional[dict]:
    if "error" in engine or "error" in reference:
        return None

    def median(run, stage):
        return run["single_stream"]["stats_ms"][stage]["median"]

    return {"input": engine["input"], "engine": f"{engine['backend']} {engine['precision']}",
            "reference": REFERENCE,
            "speedup_end_to_end": median(reference, "end_to_end") / median(engine, "end_to_end"),
            "speedup_inference": median(reference, "inference") / median(engine, "inference")}


def _variant_flops(model, precision: str) -> list:
    """The variant's FLOPs per precision at the sizes its manifest records ([] without one)."""
    if model is None:
        return []
    from trufor_trt.engine.model_dir import ModelDir

    return ModelDir.open(model).manifest["variants"].get(precision, {}).get("flops_by_precision", [])


def run_host_only_bench(options: BenchOptions, on_step=print) -> dict:
    """`bench --host-only` (host_only.py): the network's outputs replayed, the host timed; the
    outputs come from the model folder given, else from PyTorch on the CPU (no export needed)."""
    from trufor_trt.benchmarks.host_only import run_host_only, worker_counts
    from trufor_trt.engine.runner_spec import RunnerSpec, make_runner

    workers = worker_counts(options.workers)
    model, checkpoint, weights = resolve_sources(replace(options, backend="torch") if options.model is None
                                                 else options, on_step)
    if model is None:
        spec = RunnerSpec("torch", "fp32", checkpoint=checkpoint, device="cpu")
    else:
        spec = RunnerSpec(options.backend, options.precision, model=model).resolved(on_notice=on_step)
    with tempfile.TemporaryDirectory(prefix="trufor-bench-") as scratch:
        # JPEGs: what photographs arrive as, and what decoding costs most often
        images = {size: synthetic_file(*size, Path(scratch), ".jpg") for size in options.sizes}
        with make_runner(spec) as runner:
            report = run_host_only(images, runner, workers, in_fresh_process, on_step)
    report["weights"] = weights
    return report


def run_bench(options: BenchOptions, on_step=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="trufor-bench-") as scratch_name:
        scratch = Path(scratch_name)
        # First, while nothing else of ours has run: an export's sessions and threads are gone.
        on_step("measuring the CPU's FP32 GEMM rate")
        gemm = in_fresh_process(measure_gemm_rates)
        model, checkpoint, weights = resolve_sources(options, on_step)
        backend = pick_backend(options.backend, model, options.precision, on_notice=on_step)
        groups = ([image_group(options.images)] if options.images
                  else synthetic_groups(options.sizes, scratch))
        engine_spec = CaseSpec(backend, options.precision, (), options.warmup, options.repeat,
                               model=str(model) if model else None,
                               checkpoint=str(checkpoint) if checkpoint else None,
                               device=options.device, streams=options.streams)
        reference_spec = CaseSpec("torch", "fp32", (), options.warmup, options.repeat,
                                  checkpoint=str(checkpoint) if checkpoint else None,
                                  device=options.device, official=True)
        runs, comparisons = [], []
        for group in groups:
            on_step(f"{group.label}: {backend} {options.precision}")
            engine = _run_group(engine_spec, group, gemm, options.peak_gflops, "engine")
            runs.append(engine)
            if options.compare_torch:
                on_step(f"{group.label}: {REFERENCE}")
                reference = _run_group(reference_spec, group, gemm, options.peak_gflops,
                                       "reference")
                runs.append(reference)
                comparisons.append(_comparison(engine, reference))
    return {
        "tool": "trufor-trt bench", "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "cpu_gemm_gflops": gemm,
        "nominal_peak_gflops": options.peak_gflops,
        "weights": weights, "model": str(model) if model else None,
        "settings": {"warmup": options.warmup, "repeat": options.repeat, "streams": options.streams,
                     "device": options.device},
        "flops_by_precision": _variant_flops(model, options.precision),
        "runs": runs, "comparisons": [item for item in comparisons if item],
    }
