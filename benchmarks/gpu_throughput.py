"""`analyze`'s throughput against its runner's own rate, on the same images: whether the host
side keeps up with the device. Per size: the runner alone (prepared inputs, infer() one after
the other: the device's rate, its postprocessing included), then `analyze`'s pipeline with its
host workers (every core), PNGs written; their ratio, and each side's utilisation, which names
what limits when the ratio is below 1.

    python -m trufor_trt.benchmarks.gpu_throughput --checkpoint CKPT --json gpu-throughput.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from trufor_trt.benchmarks.machine import machine_info
from trufor_trt.benchmarks.stats import busiest


def _images(folder: Path, height: int, width: int, count: int) -> list:
    """`count` different synthetic photographs of this size, as JPEGs (quality 90)."""
    import cv2

    from trufor_trt.batch.inputs import ImageJob
    from trufor_trt.export.synthetic import synthetic_image

    jobs = []
    for index in range(count):
        path = folder / f"{height}x{width}-{index:03d}.jpg"
        cv2.imwrite(str(path), synthetic_image(height, width, seed=index)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        jobs.append(ImageJob(path, path.name))
    return jobs


def runner_rate(runner, jobs: list) -> float:
    """Images/s of infer() alone over the jobs' prepared inputs (decoded beforehand)."""
    from trufor_trt.engine.decode import decode_image
    from trufor_trt.engine.preprocess import prepare_input

    prepared = [prepare_input(decode_image(job.path)) for job in jobs]
    runner.infer(prepared[0])  # warm-up: kernels chosen, memory pools filled
    start = time.perf_counter()
    for image in prepared:
        runner.infer(image)
    return len(prepared) / (time.perf_counter() - start)


def analyze_rate(runner, jobs: list, out: Path, workers: int) -> dict:
    """`analyze`'s pipeline over the jobs, every output written: images/s and utilisation."""
    from trufor_trt.batch.analyze import AnalyzeOptions
    from trufor_trt.batch.pipeline import Pipeline, open_jobs
    from trufor_trt.engine.runner_spec import host_workers

    options = AnalyzeOptions(out_dir=out)
    pipeline = Pipeline([runner], options, host_workers=workers or host_workers([runner]))
    failed = []
    wall_ms = pipeline.run(open_jobs(jobs, runner, options),
                           lambda result: failed.append(result.record.reason) if result.record.status != "ok" else None)
    if failed:
        raise RuntimeError(f"{len(failed)} images failed: {failed[0]}")
    bottleneck, utilisation = busiest(pipeline.busy_ms, wall_ms,
                                      {"host": pipeline.host_workers, "inference": 1})
    return {"images_per_s": len(jobs) / (wall_ms / 1e3), "host_workers": pipeline.host_workers,
            "utilisation": utilisation, "bottleneck": bottleneck}


def measure(checkpoint: str, device: str, sizes: list, count: int, workers: int) -> dict:
    from trufor_trt.engine.torch_runner import TorchRunner

    results = {"machine": machine_info(), "device": device, "runs": []}
    with TorchRunner(checkpoint, device=device) as runner, tempfile.TemporaryDirectory() as scratch:
        for height, width in sizes:
            folder = Path(scratch) / f"{height}x{width}"
            folder.mkdir()
            jobs = _images(folder, height, width, count)
            alone = runner_rate(runner, jobs)
            pipelined = analyze_rate(runner, jobs, folder / "out", workers)
            run = {"input": f"{height}x{width}", "images": count, "runner_images_per_s": alone,
                   "analyze": pipelined, "analyze_over_runner": pipelined["images_per_s"] / alone}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
    return results


def main() -> None:
    from trufor_trt.shapes import parse_shape

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="512x512,1024x1024")
    parser.add_argument("--images", type=int, default=64, help="images per size")
    parser.add_argument("--workers", type=int, default=0, help="host workers (0: every core)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [parse_shape(part) for part in args.sizes.split(",")]
    results = measure(args.checkpoint, args.device, sizes, args.images, args.workers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
