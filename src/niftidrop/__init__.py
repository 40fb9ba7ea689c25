"""niftidrop: turn NumPy predictions into NIfTI files with their reference's geometry."""

from typing import TYPE_CHECKING, Any

from niftidrop.errors import ConfigError, ConversionError, ErrorCode, NiftidropError
from niftidrop.version import __version__

if TYPE_CHECKING:
    from niftidrop.api import ConversionResult, convert_file, nifti_to_numpy, numpy_to_nifti

# The conversion API imports numpy and nibabel; load it on first use so that
# `import niftidrop` (and every CLI command) stays quick.
_API_NAMES = {"ConversionResult", "convert_file", "nifti_to_numpy", "numpy_to_nifti"}


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from niftidrop import api

        return getattr(api, name)
    raise AttributeError(f"module 'niftidrop' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "ConversionError",
    "ConversionResult",
    "ErrorCode",
    "NiftidropError",
    "__version__",
    "convert_file",
    "nifti_to_numpy",
    "numpy_to_nifti",
]
