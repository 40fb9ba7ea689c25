"""niftidrop: turn NumPy predictions into NIfTI files with their reference's geometry."""

from importlib.metadata import PackageNotFoundError, version

from niftidrop.errors import ConfigError, ConversionError, ErrorCode, NiftidropError

try:
    __version__ = version("niftidrop")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConfigError",
    "ConversionError",
    "ErrorCode",
    "NiftidropError",
    "__version__",
]
