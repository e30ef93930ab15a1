"""The MAE inference service: FastAPI routes, dynamic batching and engines (ONNX Runtime; torch only in the optional engine)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mae-service")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
