"""The installed niftidrop's version, for every module that reports it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("niftidrop")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
