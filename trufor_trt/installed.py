"""Installed versions of the packages a report names, read from their metadata (never imported:
a broken or heavy package costs nothing here)."""

from importlib import metadata

# The extra of ours that brings each module a command may find missing.
MODULE_EXTRAS = {"torch": "export", "onnx": "export", "onnx_graphsurgeon": "export",
                 "onnxruntime": "cpu", "tensorrt": "trt", "pycuda": "trt", "cuda": "trt-cuda-python",
                 "matplotlib": "bench", "sympy": "export", "starlette": "serve", "uvicorn": "serve",
                 "prometheus_client": "serve", "multipart": "serve", "python_multipart": "serve",
                 "watchfiles": "watch", "ray": "ray", "pyarrow": "ray", "pandas": "ray"}


def install_command(module: str) -> str:
    extra = MODULE_EXTRAS.get(module)
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
