"""`serve` against `analyze` on the same images, any backend:

- analyze: one `trufor-trt analyze --no-png` run over the images as a user starts it (process
  start and model load included), and its per-image time from results.jsonl;
- serve: the same images POSTed one after another to a warm server (end to end: HTTP, queue,
  the per-image job, JSON), then by 2 clients at once (images per second), and the server
  process's peak resident memory.

    python -m trufor_trt.benchmarks.serve_latency --model MODEL_DIR --images DIR --json serve.json
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trufor_trt.benchmarks.machine import machine_info
from trufor_trt.benchmarks.stats import summarize

READY_TIMEOUT = 300
REQUEST_TIMEOUT = 600


def _cli(*args) -> list:
    return [sys.executable, "-m", "trufor_trt", *args]


def measure_analyze(model: str, backend: str, images: list) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run(_cli("analyze", *map(str, images), "--out", out, "--model", model, "--backend",
                            backend, "--no-png", "--quiet"), check=True, capture_output=True)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "per_image_ms": summarize([record["times_ms"]["total"] for record in records])}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(httpx, url: str, process) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT:
        if process.poll() is not None:
            raise RuntimeError("the server exited while starting")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready within {READY_TIMEOUT} s")


def _post_all(httpx, url: str, images: list, latencies: list) -> None:
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        for image in images:
            data = image.read_bytes()
            started = time.perf_counter()
            client.post(url + "/v1/analyze", content=data).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)


def _peak_memory_mib(pid: int):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def measure_serve(model: str, backend: str, images: list, rounds: int) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(_cli("serve", "--model", model, "--backend", backend, "--port", str(port),
                                    "--max-queue", "4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready_s = _wait_ready(httpx, url, process)
        one = []
        _post_all(httpx, url, images * rounds, one)
        two, started = [], time.perf_counter()
        clients = [threading.Thread(target=_post_all, args=(httpx, url, images * rounds, two)) for _ in range(2)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall = time.perf_counter() - started
        return {"ready_s": ready_s, "one_client_ms": summarize(one),
                "two_clients": {"images": len(two), "images_per_s": len(two) / wall, "latency_ms": summarize(two)},
                "one_client_images_per_s": 1000 / summarize(one)["mean"],
                "peak_memory_mib": _peak_memory_mib(process.pid)}
    finally:
        process.terminate()
        process.wait(REQUEST_TIMEOUT)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--rounds", type=int, default=2, help="times each image is sent per client")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    images = sorted(path for path in args.images.iterdir() if path.is_file())
    result = {"machine": machine_info(), "backend": args.backend, "images": len(images),
              "analyze": measure_analyze(args.model, args.backend, images),
              "serve": measure_serve(args.model, args.backend, images, args.rounds)}
    analyze, serve = result["analyze"], result["serve"]
    print(f"analyze: {analyze['wall_s']:.1f} s for {len(images)} images (start and load included), "
          f"median {analyze['per_image_ms']['median']:.0f} ms per image")
    print(f"serve:   ready in {serve['ready_s']:.1f} s; one client median {serve['one_client_ms']['median']:.0f} ms, "
          f"p99 {serve['one_client_ms']['p99']:.0f} ms end to end; 2 clients "
          f"{serve['two_clients']['images_per_s']:.3g} images/s (one: {serve['one_client_images_per_s']:.3g}); "
          f"peak memory {serve['peak_memory_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
