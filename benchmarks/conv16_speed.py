"""What each form of a Noiseprint++ layer costs on a CUDA GPU: one 64 -> 64 3x3 convolution
in FP32 (TF32 off, as the engines build it), in plain FP16, and centered (precision/conv16.py:
the centered input cast to float16, the float16 convolution, the offset's one-channel float32
convolution of an all-ones image, and the float32 add), timed with CUDA events through
PyTorch's cuDNN. cuDNN is not TensorRT (which may fuse the float32 parts into the
convolution's epilogue), but the ratio says what the centered form keeps of FP16's speed.

    python -m trufor_trt.benchmarks.conv16_speed --size 1536x2048 --json conv16.json
"""

import argparse
import json


def cuda_time_ms(torch, run, repeat: int) -> float:
    """Milliseconds per call of `run` on the current CUDA stream, after 3 warm-up calls."""
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def measure(height: int, width: int, repeat: int = 20) -> dict:
    import torch

    from trufor_trt.architecture import NOISEPRINT_FEATURES as channels

    conv = torch.nn.functional.conv2d
    x = torch.rand(1, channels, height, width, device="cuda")
    weight = torch.randn(channels, channels, 3, 3, device="cuda") * 0.05
    x16, w16 = x.half(), weight.half()
    center = x.mean(dim=(0, 2, 3), keepdim=True)
    offset_kernel = (weight * center).sum(1, keepdim=True)
    bias = torch.randn(channels, device="cuda")

    def centered():
        product = conv((x - center).half(), w16, padding=1)
        return product.float() + conv(torch.ones_like(x[:, :1]), offset_kernel, bias, padding=1)

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    try:
        with torch.no_grad():
            times = {"fp32": cuda_time_ms(torch, lambda: conv(x, weight, padding=1), repeat),
                     "fp16": cuda_time_ms(torch, lambda: conv(x16, w16, padding=1), repeat),
                     "centered": cuda_time_ms(torch, centered, repeat)}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    gflop = 2 * channels * channels * 9 * height * width / 1e9
    return {"gpu": torch.cuda.get_device_name(), "size": f"{height}x{width}", "layer_gflop": round(gflop, 2),
            "ms": {form: round(ms, 3) for form, ms in times.items()},
            "speedup_vs_fp32": {form: round(times["fp32"] / ms, 2) for form, ms in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1536x2048", help="HxW")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="also write the result here")
    options = parser.parse_args()
    height, width = (int(value) for value in options.size.lower().split("x"))
    result = measure(height, width, options.repeat)
    print(json.dumps(result, indent=2))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
