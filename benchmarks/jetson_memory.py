"""The Jetson memory table (docs/large-images.md): what TensorRT's chain should take per Jetson module, from the
device memory model (engine/chain_plan.py). Estimates, not measurements (no TensorRT here).

    python -m trufor_trt.benchmarks.jetson_memory [--fp32-weights BYTES] [--fp16-weights BYTES]
"""

import argparse

from trufor_trt.engine.chain_plan import JETSONS, device_memory_model, plan_chain
from trufor_trt.engine.memory_budget import GIB, MemoryBudgetError
from trufor_trt.engine.tensorrt_plan import Profile

CAMERA = (3000, 4000)  # 12 MP, 4:3
# The graphs' sizes with the official checkpoint's shapes (the seed-0 model folder's files).
WEIGHTS = {"fp32": 0.271e9, "fp16": 0.139e9}


def _largest_megapixels(precision: str, budget: float, weights: float) -> float:
    """The largest 4:3 image the chain takes within `budget`, in MP."""
    size = device_memory_model(precision, weights).largest_fitting(CAMERA[0] * 10, CAMERA[1] * 10, budget)
    return size[0] * size[1] / 1e6 if size else 0.0


def _camera_cell(precision: str, budget: float, weights: float) -> str:
    profile = Profile(min=(32, 32), opt=(768, 768), max=CAMERA)
    try:
        plan = plan_chain(precision, profile, weights, budget)
    except MemoryBudgetError:
        return "no"
    return f"yes, {plan.estimated_bytes / GIB:.1f} GiB (bands of {plan.bands.noiseprint_rows} rows)"


def table(weights: dict = WEIGHTS) -> str:
    lines = ["| module | CUDA total | free, headless (assumed) | 12 MP, FP16 chain | 12 MP, FP32 chain "
             "| largest 4:3 image, FP16 / FP32 chain |", "|---|---|---|---|---|---|"]
    for name, total, free in JETSONS:
        budget = free * GIB
        largest = " / ".join(f"{_largest_megapixels(precision, budget, weights[precision]):.0f} MP"
                             for precision in ("fp16", "fp32"))
        lines.append(f"| {name} | {total} GiB | {free} GiB | {_camera_cell('fp16', budget, weights['fp16'])} | "
                     f"{_camera_cell('fp32', budget, weights['fp32'])} | {largest} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32-weights", type=float, default=WEIGHTS["fp32"])
    parser.add_argument("--fp16-weights", type=float, default=WEIGHTS["fp16"])
    args = parser.parse_args(argv)
    print(table({"fp32": args.fp32_weights, "fp16": args.fp16_weights}))


if __name__ == "__main__":
    main()
