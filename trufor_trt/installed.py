"""Installed versions of the packages a report names, read from their metadata (never imported:
a broken or heavy package costs nothing here)."""

from importlib import metadata

# The extra of ours that brings each module a command may find missing (the GPU packages: the
# CUDA 13 extra, then the CUDA 12 one).
MODULE_EXTRAS = {"torch": "export", "onnx": "export", "onnx_graphsurgeon": "export",
                 "onnxruntime": "cpu", "tensorrt": ("trt-cu13", "trt-cu12"), "pycuda": ("trt-cu13", "trt-cu12"),
                 "cuda": ("trt-cu13-cuda-python", "trt-cu12-cuda-python"),
                 "matplotlib": "bench", "sympy": "export", "starlette": "serve", "uvicorn": "serve",
                 "prometheus_client": "serve", "multipart": "serve", "python_multipart": "serve",
                 "watchfiles": "watch", "ray": "ray", "pyarrow": "ray", "pandas": "ray"}


def install_command(module: str) -> str:
    extra = MODULE_EXTRAS.get(module)
    if isinstance(extra, tuple):  # the GPU packages: one extra per CUDA major, chosen by the driver
        return (f'pip install "trufor-trt[{extra[0]}]" with an NVIDIA driver >= 580, '
                f'"trufor-trt[{extra[1]}]" with drivers 525-575')
    return f'pip install "trufor-trt[{extra}]"' if extra else f"pip install {module}"


def distribution_versions(names) -> dict:
    """Distribution name -> its installed version, or None where it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
