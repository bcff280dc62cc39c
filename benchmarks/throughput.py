"""Images per second of the batch, four ways, each in a fresh process on the same folders:

- sequential: the per-image job one image after the other (decode, infer, postprocess, write in
  turn, no stage overlapping another), one runner;
- pipelined: `trufor-trt analyze` (its default: one runner, the stages overlapped), and
  `--streams 2` (two runners, each with half the cores);
- ray: `trufor-trt analyze --ray local` (a Ray instance started for the run, one actor per core).

Each time is the whole command's wall clock, as a user waits for it: process start, model load
(and Ray's start) included. Folders: `small` (256 x 256 CocoGlide PNGs) and `photos` (JPEGs of
1-2 MP, crops of the official 2048 x 1773 photograph, quality 90).

    python -m trufor_trt.benchmarks.throughput --model MODEL_DIR --json throughput.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trufor_trt.benchmarks.machine import machine_info

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"
PHOTO_SIZES = ((1024, 1024), (1200, 1280), (1536, 1280))  # H x W: 1.0, 1.5, 2.0 MP
MODES = {"sequential": ["--sequential"], "pipelined": [], "pipelined, 2 runners": ["--streams", "2"],
         "ray local": ["--ray", "local"]}


def make_folders(root: Path, shared: Path, small_count: int) -> dict:
    """{name: folder} of the benchmark's two image sets, written below `root`."""
    from PIL import Image

    small = root / "small"
    small.mkdir()
    for source in sorted((shared / "cocoglide_sample").rglob("*.png"))[:small_count]:
        (small / source.name).write_bytes(source.read_bytes())
    photos = root / "photos"
    photos.mkdir()
    photograph = Image.open(shared / "pristine2.jpg").convert("RGB")
    for height, width in PHOTO_SIZES:
        photograph.crop((0, 0, width, height)).save(photos / f"crop-{height}x{width}.jpg", quality=90)
    return {"small": small, "photos": photos}


def run_sequential(images: Path, out: Path, model: str, backend: str) -> None:
    """The per-image job in a plain loop, one runner with its default threads."""
    from trufor_trt.batch.analyze import AnalyzeOptions, run_job
    from trufor_trt.batch.inputs import expand_inputs
    from trufor_trt.batch.results_log import ResultsLog
    from trufor_trt.engine import create_runner

    options = AnalyzeOptions(out_dir=out)
    with create_runner(backend, model=model) as runner, ResultsLog(out) as log:
        for job in expand_inputs([str(images)]):
            log.add(run_job(job, runner, options).record)


def measure(mode: list, images: Path, model: str, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        if mode == ["--sequential"]:
            command = [sys.executable, "-m", "trufor_trt.benchmarks.throughput", "--sequential", str(images),
                       "--out", out, "--model", model, "--backend", backend]
        else:
            command = [sys.executable, "-m", "trufor_trt", "analyze", str(images), "--out", out, "--model", model,
                       "--backend", backend, "--quiet", *mode]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
    assert all(record["status"] == "ok" for record in records), records
    return {"images": len(records), "wall_s": round(wall, 2), "images_per_s": round(len(records) / wall, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--shared-images", type=Path, default=SHARED_IMAGES)
    parser.add_argument("--small", type=int, default=24, help="256 px images in the small folder")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sequential", type=Path, help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequential:
        run_sequential(args.sequential, args.out, args.model, args.backend)
        return
    results = {"machine": machine_info(), "backend": args.backend, "runs": {}}
    with tempfile.TemporaryDirectory() as root:
        for folder_name, folder in make_folders(Path(root), args.shared_images, args.small).items():
            for mode_name, mode in MODES.items():
                results["runs"][f"{folder_name} / {mode_name}"] = measure(mode, folder, args.model, args.backend)
                print(f"{folder_name} / {mode_name}: {results['runs'][f'{folder_name} / {mode_name}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
